"""Where a model can be cut, found from its graph, and the cut itself.

`trace(model)` records the model's forward as a torch.fx graph. A cut after a node is valid when exactly one
tensor crosses it: the node's own output, and nothing computed before it (nor the input) is used after it, so
inside a residual block, where the block's input waits for the addition, there is no cut. A valid cut is named
by the module whose last operation it follows (the outermost one: `layer2` rather than `layer2.1.relu`).
`split(graph, cut)` makes the two parts as GraphModules that share the model's modules and their names, so
the halves' state_dict keys are the model's own.
"""
from __future__ import annotations

import difflib
import inspect
import threading
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from splitprune.errors import UserError

OUTPUT_NAME = "cut"


@dataclass(frozen=True)
class Cut:
    name: str                   # the outermost module whose last operation the cut follows
    node: str                   # the fx node after which the model is cut
    aliases: tuple[str, ...]    # other module paths that end at the same place


class _ThreadTracer(fx.Tracer):
    """torch.fx patches nn.Module.__call__ and __getattr__ process-wide while it traces. A server builds a half
    while other sessions step, so module calls and attribute reads from any thread but the tracing one pass
    through untouched."""

    def trace(self, root, concrete_args=None):
        self._owner = threading.get_ident()
        return super().trace(root, concrete_args)

    def call_module(self, m, forward, args, kwargs):
        if threading.get_ident() != self._owner:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if threading.get_ident() != self._owner:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


_TRACING = threading.Lock()  # two traces at once would undo each other's patches when the first one ends


def trace(model: nn.Module, what: str = "the model") -> fx.GraphModule:
    """`model`'s forward as an fx graph; one UserError naming the operation that could not be traced."""
    try:
        with _TRACING:
            tracer = _ThreadTracer()
            graph = tracer.trace(model, concrete_args=_defaults(model) or None)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as exc:  # noqa: BLE001 - TraceError, TypeError, NotImplementedError, ... from user code
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{what} cannot be traced into a graph (torch.fx), so it cannot be cut by name: "
                        f"{type(exc).__name__}: {first[:300]}") from None


def _defaults(model: nn.Module) -> dict:
    """The forward's optional arguments after the input, at their defaults (an attention mask, a flag): the
    model is cut as it runs on one input."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters[1:]
            if p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _scope(node: fx.Node) -> list[str]:
    """The module paths a node runs inside, outermost first ("@1" marks of repeated calls dropped)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [key.split("@")[0] for key in stack]


def cuts(graph: fx.GraphModule) -> list[Cut]:
    """Every valid cut, in the order of the forward."""
    nodes = list(graph.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users), default=-1) for n in nodes}
    ends: dict[int, list[str]] = {}
    for i, n in enumerate(nodes):  # the last node of each module (a module's scope ends where its last node is)
        for path in _scope(n):
            ends.setdefault(path, i)
            ends[path] = i
    by_node: dict[int, list[str]] = {}
    for path, i in ends.items():
        if path:
            by_node.setdefault(i, []).append(path)
    out = []
    for i, n in enumerate(nodes):
        if n.op in ("placeholder", "output", "get_attr") or all(u.op == "output" for u in n.users):
            continue  # the model's output is no cut: the server part would have nothing to do
        crossing = [m for m in nodes[:i + 1] if last_use[m] > i]
        if crossing != [n]:
            continue
        names = sorted(by_node.get(i, []), key=lambda p: (p.count("."), p))
        if names:  # a cut that no module ends at (after an addition, a reshape) has no layer name: not offered
            out.append(Cut(names[0], n.name, tuple(names[1:])))
    return out


def find(graph: fx.GraphModule, name: str, what: str = "the model") -> Cut:
    """The valid cut `name` names (its module path or an alias of it); a UserError listing the nearest valid
    ones otherwise."""
    found = cuts(graph)
    for cut in found:
        if name == cut.name or name in cut.aliases:
            return cut
    valid = [c.name for c in found]
    modules = {n for n, _ in graph.named_modules() if n}
    close = difflib.get_close_matches(name, valid, n=4, cutoff=0.4)
    if name in modules or any(name == p for n in graph.graph.nodes for p in _scope(n)):
        why = "inside it or right after it more than one tensor crosses (a residual branch, a skip connection)"
    else:
        why = f"{what} has no module {name!r}"
    nearby = f"; valid cuts near it: {', '.join(close)}" if close else ""
    raise UserError(f"cannot cut {what} at {name!r}: {why}{nearby} (`splitprune models --model ...` lists them all)")


def split(graph: fx.GraphModule, cut: Cut) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(device part: the input to the cut tensor, server part: the cut tensor to the output). Both share the
    model's modules, with their names: their state_dict keys are the model's own."""
    nodes = list(graph.graph.nodes)
    at = next(i for i, n in enumerate(nodes) if n.name == cut.node)
    device, server = fx.Graph(), fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes[:at + 1]:
        env[n] = device.node_copy(n, lambda m: env[m])
    device.output(env[nodes[at]])
    env = {nodes[at]: server.placeholder(OUTPUT_NAME)}
    for n in nodes[at + 1:]:
        if n.op == "placeholder":
            raise UserError(f"the model takes a second input after {cut.name}: it cannot be cut there")
        env[n] = server.node_copy(n, lambda m: env[m])
    parts = fx.GraphModule(graph, device, "DevicePart"), fx.GraphModule(graph, server, "ServerPart")
    for part in parts:
        _keep_order(part, graph)
    return parts


def _keep_order(part: nn.Module, model: nn.Module) -> None:
    """Give the containers fx made for `part` the model's order of submodules and tensors (fx registers them in
    the order the forward uses them): parameters() and state_dict() then list them as the model does."""
    for name, module in part.named_modules():
        original = model.get_submodule(name) if name else model
        if module is original:
            continue
        for attr in ("_modules", "_parameters", "_buffers"):
            mine, theirs = getattr(module, attr), getattr(original, attr)
            order = {key: i for i, key in enumerate(theirs)}
            items = sorted(mine.items(), key=lambda kv: order.get(kv[0], len(order)))
            mine.clear()
            mine.update(items)


_NONNEGATIVE_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softmax)
_KEEPS_SIGN = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Identity,
               nn.Flatten)
_NONNEGATIVE_CALLS = {"relu", "relu6", "sigmoid", "softmax"}
_KEEPS_SIGN_CALLS = {"max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "flatten", "dropout",
                     "view", "reshape", "contiguous", "clone"}


def nonnegative(graph: fx.GraphModule, cut: Cut) -> bool:
    """Whether the cut tensor is never negative (made by a ReLU, perhaps pooled since): the decoder then ends
    with a ReLU as the paper's does; otherwise it must be able to give negative values back."""
    node = next(n for n in graph.graph.nodes if n.name == cut.node)
    while True:
        if node.op == "call_module":
            module = graph.get_submodule(node.target)
            if isinstance(module, _NONNEGATIVE_MODULES):
                return True
            if not isinstance(module, _KEEPS_SIGN):
                return False
        elif node.op in ("call_function", "call_method"):
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
            if name.strip("_") in _NONNEGATIVE_CALLS:
                return True
            if name.strip("_") not in _KEEPS_SIGN_CALLS:
                return False
        else:
            return False
        inputs = [a for a in node.args if isinstance(a, fx.Node)]
        if len(inputs) != 1:
            return False
        node = inputs[0]


@dataclass(frozen=True)
class NodeCost:
    shape: tuple[int, ...] | None   # the node's output per sample (None: not a tensor)
    params: int                     # parameters of everything computed up to and including the node
    macs: int                       # multiply-accumulates up to and including the node, for one sample


def profile(graph: fx.GraphModule, example: torch.Tensor) -> dict[str, NodeCost]:
    """One forward of the whole graph on `example` (meta tensors are enough), with every node's output shape and
    the parameters and MACs of the graph up to it: what every cut costs, in one pass."""
    costs: dict[str, NodeCost] = {}
    seen: set[int] = set()
    params = total = 0

    class Profiler(fx.Interpreter):
        def run_node(self, n: fx.Node):
            nonlocal params, total
            out = super().run_node(n)
            if n.op in ("call_module", "get_attr"):
                owner = self.module.get_submodule(n.target) if n.op == "call_module" else None
                tensors = owner.parameters() if owner is not None else [self.fetch_attr(n.target)]
                for p in tensors:
                    if isinstance(p, nn.Parameter) and id(p) not in seen:
                        seen.add(id(p))
                        params += p.numel()
                if owner is not None:
                    total += _module_macs(owner, out)
            shape = tuple(int(v) for v in out.shape[1:]) if isinstance(out, torch.Tensor) else None
            costs[n.name] = NodeCost(shape, params, total)
            return out

    was_training = graph.training
    graph.eval()
    try:
        with torch.no_grad():
            Profiler(graph).run(example)
    finally:
        graph.train(was_training)
    return costs


def _module_macs(module: nn.Module, output) -> int:
    if not isinstance(output, torch.Tensor) or output.dim() == 0:
        return 0
    per_sample = output.numel() // output.shape[0]
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = 1
        for k in module.kernel_size:
            kernel *= k
        return per_sample * (module.in_channels // module.groups) * kernel
    if isinstance(module, nn.Linear):
        return per_sample * module.in_features
    return 0
