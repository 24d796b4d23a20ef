"""The learned compression module at the cut: a gated encoder on the device, a decoder on the server."""
from __future__ import annotations

import torch
from torch import nn

from splitprune.errors import UserError


def _geometry(resolution: int) -> dict[str, int]:
    return {"kernel_size": 2 + resolution, "stride": resolution, "padding": resolution}


class GatedEncoder(nn.Module):
    """Conv(C->C, k=2+r, stride r, pad r) -> BN -> sigmoid, times sigmoid(p) for a learnable per-channel logit p."""

    def __init__(self, channels: int, resolution: int = 1, bn_momentum: float = 0.03, bn_eps: float = 1e-4,
                 gate_init: float = 15.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, **_geometry(resolution))
        self.bn = nn.BatchNorm2d(channels, momentum=bn_momentum, eps=bn_eps)
        self.gate_logits = nn.Parameter(gate_init * torch.rand(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.bn(self.conv(x))) * torch.sigmoid(self.gate_logits)


class Decoder(nn.Module):
    """ConvTranspose(in->C, same geometry as the encoder) -> BN -> ReLU: restores the cut tensor's size.

    `in_channels` defaults to C; a narrower input serves bottlenecks that send fewer channels than C.
    """

    def __init__(self, channels: int, resolution: int = 1, in_channels: int | None = None) -> None:
        super().__init__()
        self.deconv = nn.ConvTranspose2d(in_channels or channels, channels, **_geometry(resolution))
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.deconv(x)))


def _conv_out(size: int, resolution: int) -> int:
    g = _geometry(resolution)
    return (size + 2 * g["padding"] - g["kernel_size"]) // g["stride"] + 1


def _deconv_out(size: int, resolution: int) -> int:
    g = _geometry(resolution)
    return (size - 1) * g["stride"] - 2 * g["padding"] + g["kernel_size"]


def encoded_shape(cut_shape: tuple[int, int, int], resolution: int) -> tuple[int, int, int]:
    """Shape of what travels for a cut tensor (C, H, W); refuses factors whose decoder cannot restore H x W."""
    if resolution < 1:
        raise UserError(f"resolution factor must be 1 or more, got {resolution}")
    c, h, w = cut_shape
    eh, ew = _conv_out(h, resolution), _conv_out(w, resolution)
    if eh < 1 or ew < 1:
        raise UserError(f"resolution factor {resolution} is too large for a {h}x{w} cut tensor")
    restored = (_deconv_out(eh, resolution), _deconv_out(ew, resolution))
    if restored != (h, w):
        raise UserError(
            f"resolution factor {resolution} does not fit a {c}x{h}x{w} cut: the encoder gives {eh}x{ew}, "
            f"the decoder restores {restored[0]}x{restored[1]} instead of {h}x{w}; "
            f"use another --resolution, --split or input size")
    return c, eh, ew
