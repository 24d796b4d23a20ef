"""Split-ready models: a network cut at a named split point into a device part and a server part."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Callable, Protocol

import torch
from torch import nn

from splitprune.errors import UserError
from splitprune.models import materialize, resnet, vgg

__all__ = ["SplitModel", "build_split_model", "build_part", "list_models", "list_split_points", "cut_shape",
           "check_server_input"]
SIDES = ("device", "server")


class Splittable(Protocol):
    def split(self, point: str) -> tuple[nn.Module, nn.Module]: ...


_BUILDERS: dict[str, Callable[..., Splittable]] = {
    "vgg11_bn": vgg.vgg11_bn,
    "vgg11_bn_compact": vgg.vgg11_bn_compact,
    "resnet18": resnet.resnet18,
}

_SPLIT_POINTS: dict[str, dict[str, str]] = {
    "vgg11_bn": vgg.SPLIT_POINTS,
    "vgg11_bn_compact": vgg.SPLIT_POINTS,
    "resnet18": resnet.SPLIT_POINTS,
}

_MAX_SEARCH_SIZE = 1 << 16


@dataclass
class SplitModel:
    device: nn.Module
    server: nn.Module
    cut_shape: tuple[int, int, int]


def list_models() -> list[str]:
    return list(_BUILDERS)


def list_split_points(name: str) -> dict[str, str]:
    """Split point name -> one-line description, in network order."""
    _check_model(name)
    return dict(_SPLIT_POINTS[name])


def cut_shape(name: str, split: str, in_channels: int = 3, input_size: int = 32) -> tuple[int, int, int]:
    """(C, H, W) of the cut tensor; UserError if the names are unknown or the input is too small."""
    _check_split(name, split)
    _check_positive(in_channels=in_channels, input_size=input_size)
    shape = _meta_dry_run(name, split, in_channels, input_size)
    if shape is None:
        raise _too_small(name, split, in_channels, input_size)
    return shape


def build_split_model(
    name: str, split: str, num_classes: int, in_channels: int = 3, input_size: int = 32
) -> SplitModel:
    """Freshly initialised `name` cut at `split`; server(device(x)) is the full network's forward."""
    _check_positive(num_classes=num_classes)
    shape = cut_shape(name, split, in_channels, input_size)
    device, server = _split(name, split, num_classes, in_channels)
    return SplitModel(device=device, server=server, cut_shape=shape)


def build_part(name: str, split: str, num_classes: int, in_channels: int, side: str) -> nn.Module:
    """One side's part of `name` cut at `split` ("device": the layers up to the cut, "server": the rest), its
    weights drawn from the current random stream in the order the model's constructor draws them; the other
    part is never allocated (splitprune.models.materialize)."""
    _check_split(name, split)
    _check_positive(num_classes=num_classes, in_channels=in_channels)
    index = SIDES.index(side)
    return materialize.build_part(lambda: _BUILDERS[name](num_classes=num_classes, in_channels=in_channels),
                                  lambda model: model.split(split)[index])


def check_server_input(server: nn.Module, shape: tuple[int, int, int]) -> None:
    """Dry-run a (1, C, H, W) zeros tensor through `server`; UserError if it cannot take that shape."""
    if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
        raise UserError(f"a cut tensor shape must be three positive ints (C, H, W), got {tuple(shape)}")
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


def _split(name: str, split: str, num_classes: int, in_channels: int) -> tuple[nn.Module, nn.Module]:
    return _BUILDERS[name](num_classes=num_classes, in_channels=in_channels).split(split)


def _meta_dry_run(name: str, split: str, in_channels: int, input_size: int) -> tuple[int, int, int] | None:
    """Cut shape from a forward on the meta device (no memory, no compute); None if a layer fails."""
    with torch.device("meta"):
        device, server = _split(name, split, 1, in_channels)
        x = torch.zeros(1, in_channels, input_size, input_size)
    device.eval()
    server.eval()
    try:
        with torch.no_grad():
            cut = device(x)
            server(cut)
    except (RuntimeError, ValueError):
        return None
    c, h, w = cut.shape[1:]
    return int(c), int(h), int(w)


def _smallest_input_size(name: str, split: str, in_channels: int, above: int) -> int | None:
    lo, hi = above + 1, max(2 * above, 64)
    while _meta_dry_run(name, split, in_channels, hi) is None:
        if hi >= _MAX_SEARCH_SIZE:
            return None
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        if _meta_dry_run(name, split, in_channels, mid) is None:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _too_small(name: str, split: str, in_channels: int, input_size: int) -> UserError:
    smallest = _smallest_input_size(name, split, in_channels, input_size)
    hint = f"; the smallest input size that works is {smallest}" if smallest is not None else ""
    return UserError(
        f"input size {input_size}x{input_size} is too small for {name} split at {split}: "
        f"a pooling or convolution layer would produce an empty feature map{hint}"
    )


def _check_model(name: str) -> None:
    if name not in _BUILDERS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(_BUILDERS)}")


def _check_split(name: str, split: str) -> None:
    points = list_split_points(name)
    if split not in points:
        raise UserError(f"unknown split point {split!r} for {name}; choose one of: {', '.join(points)}")


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{key} must be a positive integer, got {value!r}")


def _fmt(shape: tuple[int, ...]) -> str:
    return " x ".join(str(v) for v in shape)
