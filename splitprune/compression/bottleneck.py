"""The learned compression module at the cut: a gated encoder on the device, a decoder on the server."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from splitprune.adaptive.budgets import ladder as budget_ladder
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


@functools.lru_cache(maxsize=64)
def _ladder(top: int) -> tuple[int, ...]:
    return tuple(budget_ladder(list(range(1, top + 1))))


def ladder(top: int) -> list[int]:
    """The budget ladder of an any-budget model of `top` channels: 1, 2, 4, ... below `top`, then `top` (the
    ladder `--budget auto` steps through, adaptive.budgets.ladder, of every budget 1..top)."""
    return list(_ladder(top))


def rung(budget: int | None, channels: int) -> int:
    """Which rung of ladder(channels) serves `budget` (None: all): the largest one not above it."""
    if budget is None or budget >= channels:
        return len(ladder(channels)) - 1
    return budget.bit_length() - 1


class RungBatchNorm(nn.Module):
    """BatchNorm2d over C channels with one set of running statistics and one affine transform per rung of
    the budget ladder of the `sent` channels (the switchable BatchNorm of slimmable networks). With a prefix
    of b channels sent, the deconvolution's output statistics depend on b (more channels, larger sums): shared running statistics, a mixture over the
    trained budgets, are wrong for every budget at evaluation (measured: 20% test accuracy at B=1 with them,
    82% with statistics of B=1 itself, on an any-budget model after 3 quick-profile epochs).

    Training normalises with the batch's statistics as BatchNorm does; the running statistics are updated by
    `track`, for every rung at once (a rung trained only now and then would keep stale statistics: measured
    14% at B=2 with them, 72% recomputed). Each rung's affine transform learns from the forwards at that
    rung: on validation data, +0.34 / +0.12 pt (seeds 0 / 1) on average over the budgets 1..64 against one
    shared transform (docs/design.md)."""

    def __init__(self, channels: int, sent: int, momentum: float = 0.1, eps: float = 1e-5,
                 track_forward: bool = False) -> None:
        super().__init__()
        rungs = len(ladder(sent))
        self.sent, self.momentum, self.eps, self.track_forward = sent, momentum, eps, track_forward
        self.budget: int | None = None   # a layer inside a Sequential is told its budget (per_budget_norms)
        self.calibrating: set[int] | None = None  # rungs recomputed from scratch in a calibration round (precise BN)
        self.weight = nn.Parameter(torch.ones(rungs, channels))
        self.bias = nn.Parameter(torch.zeros(rungs, channels))
        self.register_buffer("running_mean", torch.zeros(rungs, channels))
        self.register_buffer("running_var", torch.ones(rungs, channels))
        self.register_buffer("num_batches_tracked", torch.zeros(rungs, dtype=torch.long))

    def forward(self, x: torch.Tensor, budget: int | None = None) -> torch.Tensor:
        budget = self.budget if budget is None else budget
        r = rung(budget, self.sent)
        if self.training:
            if self.track_forward:
                self.track_rung(r, x)
            return F.batch_norm(x, None, None, self.weight[r], self.bias[r], True, 0.0, self.eps)
        return F.batch_norm(x, self.running_mean[r], self.running_var[r], self.weight[r], self.bias[r], False,
                            0.0, self.eps)

    @torch.no_grad()
    def track(self, per_rung: list[torch.Tensor]) -> None:
        """Update rungs 0..len(per_rung)-1 with the batch statistics of their inputs (as BatchNorm2d would)."""
        for r, y in enumerate(per_rung):
            self.track_rung(r, y)

    @torch.no_grad()
    def track_rung(self, r: int, y: torch.Tensor) -> None:
        """Update rung r with the batch statistics of y: a running average, or while `calibrating`, the plain
        average of the round's batches (a rung starts afresh at its first batch of the round)."""
        var, mean = torch.var_mean(y, dim=(0, 2, 3), unbiased=True)
        if self.calibrating is not None and r not in self.calibrating:
            self.calibrating.add(r)
            self.running_mean[r].zero_()
            self.running_var[r].fill_(1.0)
            self.num_batches_tracked[r] = 0
        self.num_batches_tracked[r] += 1
        weight = 1.0 / float(self.num_batches_tracked[r]) if self.calibrating is not None else self.momentum
        self.running_mean[r].lerp_(mean, weight)
        self.running_var[r].lerp_(var, weight)


def per_budget_norms(layers: nn.Module, sent: int) -> None:
    """Give every BatchNorm2d in `layers` (the server's backbone after the decoder of an any-budget model)
    running statistics per budget rung, tracked by the training forwards at that rung: the features past
    the cut differ with the budget, and statistics shared by all budgets fit none (the switchable
    BatchNorm of slimmable networks; measured on an any-budget model, recomputing them per budget gave
    +2.1 pt at all channels). Their owner (training.halves.ServerHalf) sets their `budget` before a forward."""
    for name, child in list(layers.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            norm = RungBatchNorm(child.num_features, sent, child.momentum, child.eps, track_forward=True)
            with torch.no_grad():
                norm.weight.copy_(child.weight.expand_as(norm.weight))
                norm.bias.copy_(child.bias.expand_as(norm.bias))
            setattr(layers, name, norm)
        else:
            per_budget_norms(child, sent)


class PrefixDecoder(Decoder):
    """The decoder of any-budget models: its BatchNorm keeps running statistics per budget rung (RungBatchNorm),
    chosen by how many channels arrived. Its initial weights are the gated decoder's (BN draws nothing).

    Each training forward at budget b also gives every rung up to b its statistics: the deconvolution is
    linear, so the outputs for the prefixes 1, 2, 4, ... are cumulative sums of the contributions of their
    channel groups, one extra deconvolution's worth of work (no gradient)."""

    def __init__(self, channels: int, resolution: int = 1, relu: bool = True) -> None:
        super().__init__(channels, resolution, relu=relu)
        self.bn = RungBatchNorm(channels, channels)

    def forward(self, x: torch.Tensor, budget: int | None = None) -> torch.Tensor:
        if self.training:
            self.bn.track(self._rung_outputs(x, x.shape[1] if budget is None else budget))
        return self.relu(self.bn(self.deconv(x), budget))

    @torch.no_grad()
    def _rung_outputs(self, x: torch.Tensor, budget: int) -> list[torch.Tensor]:
        """The deconvolution's output for each prefix of the ladder up to `budget` (the rungs it can serve)."""
        d = self.deconv
        out, low, total = [], 0, d.bias.view(1, -1, 1, 1)
        for high in ladder(x.shape[1]):
            if high > budget:
                break
            total = total + F.conv_transpose2d(x[:, low:high], d.weight[low:high], None, d.stride, d.padding)
            out.append(total)
            low = high
        return out


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
