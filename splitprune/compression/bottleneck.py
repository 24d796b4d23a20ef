"""The learned compression module at the cut: a gated encoder on the device, a decoder on the server."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from splitprune.compression.budget import channel_mask, select_top_b
from splitprune.compression.passthrough import IDENTITY_GATE, IDENTITY_SCALE, fit_norm, identity_kernel, set_norm
from splitprune.errors import UserError
from splitprune.models.randomness import private_rng


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
        y = self.conv(x)
        if self.training and "fit_pending" in self._buffers and self.fit_pending:
            fit_norm(self.bn, y, IDENTITY_SCALE)
            self.fit_pending.zero_()
        return torch.sigmoid(self.bn(y)) * torch.sigmoid(self.gate_logits)

    @torch.no_grad()
    def start_as_identity(self) -> None:
        """Start as a pass-through: every channel sent, sigmoid(s x) in sigmoid's nearly linear range, from which
        IdentityDecoder gets x back. Exact in evaluation at once (the initial statistics); the BatchNorm's affine
        transform is fitted to the first training batch (data-dependent, like ActNorm) so that it holds in
        training too."""
        identity_kernel(self.conv)
        set_norm(self.bn, scale=IDENTITY_SCALE, shift=0.0)
        self.gate_logits.fill_(IDENTITY_GATE)
        self.register_buffer("fit_pending", torch.ones(()))


class Decoder(nn.Module):
    """ConvTranspose(in->C, same geometry as the encoder) -> BN -> ReLU: restores the cut tensor's size.

    `in_channels` defaults to C; a narrower input serves bottlenecks that send fewer channels than C.
    `budget` (how many channels were sent) is not used: one BatchNorm serves every budget.
    """

    def __init__(self, channels: int, resolution: int = 1, in_channels: int | None = None, relu: bool = True) -> None:
        super().__init__()
        self.deconv = nn.ConvTranspose2d(in_channels or channels, channels, **_geometry(resolution))
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: torch.Tensor, budget: int | None = None) -> torch.Tensor:
        y = self.deconv(x)
        if self.training and "fit_pending" in self._buffers and self.fit_pending:
            fit_norm(self.bn, y, 1.0)
            self.fit_pending.zero_()
        return self.relu(self.bn(y))

    @torch.no_grad()
    def start_as_identity(self) -> None:
        """The inverse of GatedEncoder.start_as_identity: (4 z - 2) / s undoes sigmoid(s x) to first order, and the
        BatchNorm passes it through (in evaluation at once, in training from the first batch on)."""
        identity_kernel(self.deconv, 4.0 / IDENTITY_SCALE)
        self.deconv.bias.fill_(-2.0 / IDENTITY_SCALE)
        set_norm(self.bn, scale=1.0, shift=0.0)
        self.register_buffer("fit_pending", torch.ones(()))


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


# ---------------------------------------------------------------------------------------------- pluggable parts
class ChannelSelector(Protocol):
    """Which channels travel at a budget; the DeviceWorker asks it every step."""

    uses_budget_loss: bool  # whether the gate's budget loss trains alongside (it steers the gate's top-B)
    prefix: bool            # whether it always keeps channels 0..B-1 (they travel as a prefix length)

    def select(self, gate_logits: torch.Tensor, budget: int) -> torch.Tensor: ...


class TopBByGate:
    """The method's choice: the B channels with the largest gate mask (exact, ties to the lower index)."""

    uses_budget_loss = True
    prefix = False

    def select(self, gate_logits: torch.Tensor, budget: int) -> torch.Tensor:
        return select_top_b(channel_mask(gate_logits), budget)


class PrefixChannels:
    """Any-budget models: the first B channels, whatever the gate says; no budget loss. Training makes
    every prefix a good code (splitprune.training.objectives.NestedPrefixes)."""

    uses_budget_loss = False
    prefix = True

    def select(self, gate_logits: torch.Tensor, budget: int) -> torch.Tensor:
        return torch.arange(budget, device=gate_logits.device)


class FixedChannels:
    """Always the same channels, whatever the gate says; no budget loss (a baseline)."""

    uses_budget_loss = False
    prefix = False

    def __init__(self, indices: torch.Tensor) -> None:
        self.indices = indices.sort().values

    def select(self, gate_logits: torch.Tensor, budget: int) -> torch.Tensor:
        if budget != self.indices.numel():
            raise UserError(f"this model sends its {self.indices.numel()} fixed channels, not {budget}")
        return self.indices.to(gate_logits.device)


@dataclass(frozen=True)
class FixedRandomChannels:
    """Choice of selector: `count` channels drawn at random once from (run seed, channel count)."""

    count: int
    seed_offset: int = 4242

    def build(self, channels: int, seed: int) -> FixedChannels:
        gen = torch.Generator().manual_seed(seed + self.seed_offset)
        return FixedChannels(torch.randperm(channels, generator=gen)[:self.count])


class NarrowEncoder(nn.Module):
    """Conv(C->W, the gated encoder's geometry) -> BN -> sigmoid, no gate. Its `gate_logits` are constant
    (never trained, no part in "binary" scaling): the device code reads them like a gated encoder's."""

    def __init__(self, channels: int, width: int, resolution: int = 1, bn_momentum: float = 0.03,
                 bn_eps: float = 1e-4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, width, **_geometry(resolution))
        self.bn = nn.BatchNorm2d(width, momentum=bn_momentum, eps=bn_eps)
        self.gate_logits = nn.Parameter(torch.full((1, width, 1, 1), 15.0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.bn(self.conv(x)))


@dataclass(frozen=True)
class NarrowBottleneck:
    """Choice of bottleneck: a learned `width`-channel encoder/decoder pair instead of the gated C-channel one."""

    width: int
    seed_offset: int = 99

    def build(self, channels: int, resolution: int, bn_momentum: float, bn_eps: float,
              seed: int) -> tuple[NarrowEncoder, Decoder]:
        with private_rng(seed + self.seed_offset):
            encoder = NarrowEncoder(channels, self.width, resolution, bn_momentum, bn_eps)
            decoder = Decoder(channels, resolution, in_channels=self.width)
        return encoder, decoder
