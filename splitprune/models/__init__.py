"""Split-ready models: any model source (models.sources) cut at a named layer (models.graph) into a device part
and a server part, the built-in backbones included: one way to cut every model.

A model is described by its source text (`vgg11_bn`, `torchvision:resnet50`, `timm:NAME`, `py:mod:factory`), its
input channels and the class count; what the graph says about it (its valid cuts, its head, the channels its
stem takes) is found once per process on the meta device, without memory or weights.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn

from splitprune.errors import UserError
from splitprune.models import graph, materialize, resnet, sources, vgg
from splitprune.models.weights import Weights, file_digest, load_part, match, read_state

__all__ = ["CutInfo", "Weights", "build_part", "build_whole", "check_model", "check_server_input", "cut_nonnegative",
           "cut_shape", "file_digest", "head_note", "list_cuts", "list_models", "load_part", "load_weights",
           "model_in_channels", "resolve_cut"]
SIDES = ("device", "server")
_NAMED_CUTS: dict[str, dict[str, tuple[str, str]]] = {
    "vgg11_bn": vgg.CUTS, "vgg11_bn_compact": vgg.CUTS, "resnet18": resnet.CUTS}
_PLAN_CLASSES = 10  # the class count a model's plan is traced with (the head is the only part that depends on it)
_MAX_SEARCH_SIZE = 1 << 14


@dataclass(frozen=True)
class CutInfo:
    name: str                      # the --split name (a built-in backbone's own name where it has one)
    layer: str                     # the module path the cut follows
    shape: tuple[int, ...] | None  # the cut tensor per sample; None: the input is too small for this cut
    device_params: int
    server_params: int
    device_macs: int | None
    description: str

    @property
    def fp32_bytes(self) -> int | None:
        return None if self.shape is None else 4 * _prod(self.shape)

    @property
    def feature_map(self) -> bool:
        return self.shape is not None and feature_map(self.shape)


def feature_map(shape: tuple[int, ...]) -> bool:
    """Whether a cut tensor (per sample) is a C x H x W feature map. A square input makes H = W, so H x W x C
    (channels last, as Swin's stages give) shows as its first two sizes equal and the third not."""
    return len(shape) == 3 and not (shape[0] == shape[1] != shape[2])


@dataclass(frozen=True)
class _Plan:
    """What a model source is, found on the meta device: its graph, its cuts and its head."""

    source: sources.Source
    graph: torch.fx.GraphModule
    cuts: tuple[graph.Cut, ...]
    head: str | None          # the Linear the model's output comes from (replaceable for another class count)
    takes_classes: bool       # whether the builder makes the head for the class count it is given
    outputs: int | None       # the head's outputs when the builder does not take the class count
    in_channels: int | None   # the channels the model's first convolution takes (None: as many as it is given)


def list_models() -> list[str]:
    """The built-in backbones (any torchvision:NAME, timm:NAME or py:module:factory works too)."""
    return list(sources.BUILTIN)


@functools.lru_cache(maxsize=16)
def _plan(model: str, in_channels: int) -> _Plan:
    source = sources.parse_source(model)
    skeleton = _skeleton(sources.builder(source, _PLAN_CLASSES, in_channels), model)
    traced = graph.trace(skeleton, f"model {model}")
    head = _head(traced)
    takes = source.kind != "py" or sources.accepts_classes(source)
    outputs = None if takes or head is None else traced.get_submodule(head).out_features
    return _Plan(source, traced, tuple(graph.cuts(traced)), head, takes, outputs, _first_conv_channels(traced))


def _skeleton(build, model: str) -> nn.Module:
    """The model without memory (meta tensors); one built for real when its constructor reads values."""
    try:
        with torch.device("meta"):
            return build()
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - e.g. .tolist() of a meta tensor in a constructor
        return build().to("meta")


def _head(traced: torch.fx.GraphModule) -> str | None:
    output = next(n for n in traced.graph.nodes if n.op == "output")
    node = output.args[0]
    if isinstance(node, torch.fx.Node) and node.op == "call_module" and \
            isinstance(traced.get_submodule(node.target), nn.Linear):
        return str(node.target)
    return None


def _first_conv_channels(traced: torch.fx.GraphModule) -> int | None:
    for node in traced.graph.nodes:
        if node.op == "call_module":
            module = traced.get_submodule(node.target)
            if isinstance(module, nn.modules.conv._ConvNd):
                return module.in_channels
    return None


def model_in_channels(model: str) -> int | None:
    """The input channels `model` requires, or None when it is built for any (the built-in backbones)."""
    if sources.parse_source(model).kind == "builtin":
        return None
    return _plan(model, 3).in_channels


def _named(model: str) -> dict[str, tuple[str, str]]:
    return _NAMED_CUTS.get(model, {})


def resolve_cut(model: str, split: str, in_channels: int = 3) -> graph.Cut:
    """The valid cut `split` names in `model`: a layer path, or a built-in backbone's name for one (conv5)."""
    plan = _plan(model, in_channels)
    layer = _named(model).get(split, (split, ""))[0]
    return graph.find(plan.graph, layer, f"model {model}")


def cut_nonnegative(model: str, split: str, in_channels: int = 3) -> bool:
    """Whether the cut tensor is never negative (the decoder then ends with a ReLU, as the paper's does)."""
    return graph.nonnegative(_plan(model, in_channels).graph, resolve_cut(model, split, in_channels))


def cut_shape(model: str, split: str, in_channels: int = 3, input_size: int = 32) -> tuple[int, ...]:
    """The cut tensor's shape per sample ((C, H, W) for a feature map); UserError if the names are unknown or
    the input is too small."""
    _check_positive(in_channels=in_channels, input_size=input_size)
    cut = resolve_cut(model, split, in_channels)
    shape = _meta_dry_run(_plan(model, in_channels), cut, in_channels, input_size)
    if shape is None:
        raise _too_small(model, split, cut, in_channels, input_size)
    return shape


def check_model(model: str, split: str, num_classes: int, in_channels: int, input_size: int) -> tuple[int, int, int]:
    """Everything about the model that can be known without building it: the source, the cut, the input size,
    a feature-map cut, a head that fits the class count. Returns the cut's (C, H, W)."""
    _check_positive(num_classes=num_classes)
    plan = _plan(model, in_channels)
    if plan.in_channels is not None and plan.in_channels != in_channels and plan.source.kind != "builtin":
        raise UserError(f"model {model} takes {plan.in_channels}-channel images, not {in_channels} (--in-channels)")
    shape = cut_shape(model, split, in_channels, input_size)
    if not feature_map(shape):
        raise UserError(f"the cut at {split!r} of {model} is a tensor of shape {_fmt(shape)} per sample, not a "
                        "feature map (C x H x W; tokens or channels-last maps are not gated): the bottleneck gates "
                        "the channels of a convolutional feature map, so cut where one is (`splitprune models "
                        "--model ...` marks the others)")
    if not plan.takes_classes and plan.head is None:
        outputs = _outputs(plan, in_channels, input_size)
        if outputs != num_classes:
            raise UserError(f"model {model} gives {outputs} outputs but the data has {num_classes} classes, and its "
                            "last layer is not a Linear that could be replaced: give a factory that takes "
                            "num_classes")
    return shape  # type: ignore[return-value]


def _outputs(plan: _Plan, in_channels: int, input_size: int) -> int | None:
    x = torch.zeros(1, in_channels, input_size, input_size, device="meta")
    try:
        out = list(graph.profile(plan.graph, x).values())[-1]
    except Exception:  # noqa: BLE001 - cut_shape has checked the size already
        return None
    return out.shape[-1] if out.shape else None


def head_note(model: str, num_classes: int, in_channels: int) -> str | None:
    """What is said when a model's own head is replaced for the data's class count, or None."""
    plan = _plan(model, in_channels)
    if plan.outputs is None or plan.outputs == num_classes or plan.head is None:
        return None
    return (f"model {model}'s head {plan.head} gives {plan.outputs} outputs; the data has {num_classes} classes: "
            f"it is replaced by a fresh Linear with {num_classes} outputs")


def _builder(model: str, num_classes: int, in_channels: int):
    plan = _plan(model, in_channels)
    build = sources.builder(plan.source, num_classes, in_channels)
    if plan.outputs is None or plan.outputs == num_classes or plan.head is None:
        return build

    def with_head() -> nn.Module:
        whole = build()
        parent, _, attr = plan.head.rpartition(".")
        old = whole.get_submodule(plan.head)
        setattr(whole.get_submodule(parent) if parent else whole, attr,
                nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
        return whole

    return with_head


def build_whole(model: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """The whole model, freshly initialised from the current random stream (its head fits `num_classes`)."""
    return _builder(model, num_classes, in_channels)()


def build_part(model: str, split: str, num_classes: int, in_channels: int, side: str) -> nn.Module:
    """One side's part of `model` cut at `split` ("device": the layers up to the cut, "server": the rest), its
    weights drawn from the current random stream in the order the model's constructor draws them; the other
    part is never allocated (splitprune.models.materialize). Its state_dict keys are the whole model's."""
    _check_positive(num_classes=num_classes, in_channels=in_channels)
    cut = resolve_cut(model, split, in_channels)
    index = SIDES.index(side)
    return materialize.build_part(_builder(model, num_classes, in_channels),
                                  lambda whole: graph.split(graph.trace(whole), cut)[index])


@functools.lru_cache(maxsize=2)
def load_weights(model: str, num_classes: int, in_channels: int, path: str, sha256: str | None = None) -> Weights:
    """The weights file `path` for `model`, checked against the model's tensors (nothing built); `sha256`: the
    digest the run was started with (a changed file is refused)."""
    if sha256 is not None and file_digest(path) != sha256:
        raise UserError(f"--weights {path} is not the file this run started from (its SHA-256 differs from "
                        f"{sha256[:16]}...)")
    state = read_state(path)
    skeleton = _skeleton(_builder(model, num_classes, in_channels), model)
    return match(state, skeleton, _plan(model, in_channels).head, path)


def check_server_input(server: nn.Module, shape: tuple[int, ...]) -> None:
    """Dry-run a (1, *shape) zeros tensor through `server`; UserError if it cannot take that shape."""
    if not shape or not all(isinstance(v, int) and v > 0 for v in shape):
        raise UserError(f"a cut tensor shape must be positive ints, got {tuple(shape)}")
    ref = next(chain(server.parameters(), server.buffers()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    was_training = server.training
    server.eval()
    try:
        with torch.no_grad():
            server(torch.zeros(1, *shape, device=device, dtype=dtype))
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"the server part cannot take a cut tensor of shape {_fmt(shape)}: {exc}") from exc
    finally:
        server.train(was_training)


def list_cuts(model: str, num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> list[CutInfo]:
    """Every valid cut of `model`, in forward order, with its tensor, the parts' sizes and the device's MACs."""
    _check_positive(num_classes=num_classes, in_channels=in_channels, input_size=input_size)
    plan = _plan(model, in_channels)
    names = {layer: (name, text) for name, (layer, text) in _named(model).items()}
    total = sum(p.numel() for p in plan.graph.parameters())
    x = torch.zeros(1, in_channels, input_size, input_size, device="meta")
    try:
        costs = graph.profile(plan.graph, x)
    except Exception:  # noqa: BLE001 - the input is too small for some layer: the cuts before it still work
        costs = {}
    out = []
    for cut in plan.cuts:
        cost = costs.get(cut.node)
        if cost is None:
            device, _ = graph.split(plan.graph, cut)
            params = sum(p.numel() for p in device.parameters())
            shape, macs = _meta_dry_run(plan, cut, in_channels, input_size), None
        else:
            params, shape, macs = cost.params, cost.shape, cost.macs
        name, text = names.get(cut.name, (cut.name, ""))
        out.append(CutInfo(name, cut.name, shape, params, total - params, macs, text))
    return out


def _meta_dry_run(plan: _Plan, cut: graph.Cut, in_channels: int, input_size: int) -> tuple[int, ...] | None:
    """The cut tensor's shape from a forward on the meta device (no memory, no compute); None if a layer fails."""
    device, server = graph.split(plan.graph, cut)
    x = torch.zeros(1, in_channels, input_size, input_size, device="meta")
    was_training = plan.graph.training
    plan.graph.eval()
    try:
        with torch.no_grad():
            out = device(x)
            server(out)
    except Exception:  # noqa: BLE001 - any layer refusing the size (RuntimeError, ValueError, AssertionError, ...)
        return None
    finally:
        plan.graph.train(was_training)
    if not isinstance(out, torch.Tensor):
        return None
    return tuple(int(v) for v in out.shape[1:])


def _smallest_input_size(plan: _Plan, cut: graph.Cut, in_channels: int, above: int) -> int | None:
    lo, hi = above + 1, max(2 * above, 64)
    while _meta_dry_run(plan, cut, in_channels, hi) is None:
        if hi >= _MAX_SEARCH_SIZE:
            return None
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        if _meta_dry_run(plan, cut, in_channels, mid) is None:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _too_small(model: str, split: str, cut: graph.Cut, in_channels: int, input_size: int) -> UserError:
    smallest = _smallest_input_size(_plan(model, in_channels), cut, in_channels, input_size)
    hint = f"; the smallest input size that works is {smallest}" if smallest is not None else ""
    return UserError(
        f"input size {input_size}x{input_size} does not fit {model} split at {split}: a layer cannot take it "
        f"(a pooling or convolution layer would produce an empty feature map, or the model wants a fixed size){hint}")


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{key} must be a positive integer, got {value!r}")


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for v in shape:
        out *= v
    return out


def _fmt(shape: tuple[int, ...]) -> str:
    return " x ".join(str(v) for v in shape)
