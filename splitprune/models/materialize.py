"""Build a whole model without memory, then give real values to the part one side needs, and to nothing else.

`record(build)` runs a model's constructor on fake tensors (no memory, no compute) under a dispatch mode that
logs, per storage, every op that made or wrote it; `materialize(part, recording)` gives the parameters and
buffers of a part of that model real CPU tensors by replaying, in the constructor's order, only the ops that
made them, random ones drawing from the caller's random stream (torch's default generator, which the caller
seeds). Replaying every tensor of a model with the seed its constructor ran under gives exactly the
constructor's values; replaying one half draws that half from its own stream, and the other half is never
allocated.

What cannot be replayed tensor by tensor raises NotReplayable: a tensor computed from another one (a
parameter made as `ones(n) * 1e-6`), a write into a slice, a copy from another tensor, storage shared by two
tensors, or a constructor that reads values (rejection sampling, `.tolist()` of a tensor): the caller then
builds the whole model for real instead (`build_part` does).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from splitprune.models.randomness import private_rng

# ops that set every element of their first argument without reading it
WRITERS = frozenset({"uniform_", "normal_", "fill_", "zero_", "bernoulli_", "random_", "exponential_", "geometric_",
                     "cauchy_", "log_normal_"})
CONSTANTS = frozenset({"lift_fresh", "lift_fresh_copy"})


class NotReplayable(Exception):
    """A tensor of the model was made in a way `materialize` cannot replay on its own."""


@dataclass
class _Op:
    index: int
    func: object
    args: tuple
    kwargs: dict


@dataclass
class Recording:
    ops: dict[int, list[_Op]] = field(default_factory=dict)   # storage -> the ops that made and wrote it
    broken: dict[int, str] = field(default_factory=dict)      # storage -> why it cannot be replayed
    keep: list = field(default_factory=list)                  # every tensor seen: no storage address is reused


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _name(func) -> str:
    return func.overloadpacket.__name__


def _whole(t: torch.Tensor) -> bool:
    return not t.storage_offset() and t.is_contiguous() and \
        t.numel() * t.element_size() == t.untyped_storage().nbytes()


class _Recorder(TorchDispatchMode):
    def __init__(self, rec: Recording) -> None:
        super().__init__()
        self.rec, self.step = rec, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.step += 1
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        self.rec.keep.extend(tensors)
        if isinstance(out, torch.Tensor):
            self.rec.keep.append(out)
        name, ops, broken = _name(func), self.rec.ops, self.rec.broken
        if func._schema.is_mutable and tensors and args[0] is tensors[0]:
            key = _key(args[0])
            if any(isinstance(a, torch.Tensor) for a in (*args[1:], *kwargs.values())):
                broken.setdefault(key, f"{name} from another tensor")
            elif not _whole(args[0]):
                broken.setdefault(key, f"{name} on a part of it")
            else:
                ops.setdefault(key, []).append(_Op(self.step, func, tuple(args[1:]), dict(kwargs)))
        elif isinstance(out, torch.Tensor):
            if name in CONSTANTS and tensors and not isinstance(args[0], FakeTensor):
                ops.setdefault(_key(out), []).append(
                    _Op(self.step, torch.ops.aten.clone.default, (args[0].detach().clone(),), {}))
            elif not tensors:   # a factory: empty, zeros, ones, full, arange, ...
                ops.setdefault(_key(out), []).append(_Op(self.step, func, tuple(args), dict(kwargs)))
            elif _key(out) not in {_key(t) for t in tensors}:
                broken.setdefault(_key(out), f"computed by {name}")
        return out


def record(build: Callable[[], nn.Module]) -> tuple[nn.Module, Recording]:
    """The model `build()` makes, on fake tensors, and how each of its tensors was made. Raises NotReplayable
    when the constructor needs real values; the caller's random stream is left as it was."""
    rec = Recording()
    try:
        with private_rng(), FakeTensorMode(allow_non_fake_inputs=True), _Recorder(rec):
            model = build()
    except NotReplayable:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. DataDependentOutputException: it reads what it made
        raise NotReplayable(f"the constructor reads values it made ({type(exc).__name__})") from None
    return model, rec


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, t) for n, t in (*module.named_parameters(remove_duplicate=False),
                                *module.named_buffers(remove_duplicate=False)) if t is not None]


def _on_cpu(kwargs: dict) -> dict:
    return {**kwargs, "device": torch.device("cpu")} if "device" in kwargs else kwargs


def materialize(part: nn.Module, rec: Recording) -> nn.Module:
    """`part` (a part of a recorded model) with real CPU tensors, replayed in the constructor's order from the
    current random stream; NotReplayable (and `part` untouched) when one of them cannot be."""
    keys: dict[str, int] = {}
    for name, t in _tensors(part):
        key = _key(t)
        if key in rec.broken:
            raise NotReplayable(f"{name}: {rec.broken[key]}")
        if key in keys.values():
            raise NotReplayable(f"{name} shares its storage with another tensor")
        if not rec.ops.get(key):
            raise NotReplayable(f"{name}: no op gave it its values")
        keys[name] = key
    sequence = sorted(((op.index, name, op) for name, key in keys.items() for op in rec.ops[key]),
                      key=lambda item: item[0])
    defined: set[str] = set()
    for _, name, op in sequence:  # checked before anything is drawn: a refusal leaves the stream as it was
        if op.func._schema.is_mutable and name not in defined and _name(op.func) not in WRITERS:
            raise NotReplayable(f"{name}: {_name(op.func)} reads values it was never given")
        defined.add(name)
    real = {name: torch.empty(t.shape, dtype=t.dtype) for name, t in _tensors(part)}
    with torch.no_grad():
        for _, name, op in sequence:
            target = real[name]
            if op.func._schema.is_mutable:
                op.func(target, *op.args, **op.kwargs)
            else:
                made = op.func(*op.args, **_on_cpu(op.kwargs))
                if made.numel() != target.numel():
                    raise NotReplayable(f"{name}: made with {made.numel()} values, holds {target.numel()}")
                target.copy_(made.reshape(target.shape))
    for name, t in _tensors(part):
        owner_name, _, attr = name.rpartition(".")
        owner = part.get_submodule(owner_name)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(real[name], requires_grad=t.requires_grad)
        else:
            owner._buffers[attr] = real[name]
    return part


def build_part(build: Callable[[], nn.Module], cut: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """The part `cut(model)` of the model `build()` makes, its tensors drawn from the current random stream in
    the constructor's order, the rest of the model never allocated; a model that cannot be replayed is built
    for real (from the same stream) and cut."""
    try:
        model, rec = record(build)
        return materialize(cut(model), rec)
    except NotReplayable:
        return cut(build())
