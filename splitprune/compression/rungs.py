"""The server's pieces per rung of the budget ladder, for any-budget models: the ladder itself, BatchNorms with
statistics and an affine transform per rung, the prefix decoder, and (--rung-decoder) a deconvolution per rung."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from splitprune.adaptive.budgets import ladder as budget_ladder
from splitprune.compression.bottleneck import Decoder


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
    of b channels sent, the deconvolution's output statistics depend on b (more channels, larger sums): shared
    running statistics, a mixture over the trained budgets, are wrong for every budget at evaluation (measured:
    20% test accuracy at B=1 with them, 82% with statistics of B=1 itself, on an any-budget model after 3
    quick-profile epochs).

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


class RungDeconv(nn.Module):
    """The decoder's transposed convolution once per rung of the ladder, each over the channels its rung receives
    (a first server layer per budget, as each dedicated model has its own; the device and the wire stay one
    model). Starts as copies of `shared` (the same function); a budget between rungs is decoded by the rung below
    it, from that rung's channels."""

    def __init__(self, shared: nn.ConvTranspose2d) -> None:
        super().__init__()
        self.stride, self.padding = shared.stride, shared.padding
        rungs = ladder(shared.in_channels)
        self.weight = nn.ParameterList([nn.Parameter(shared.weight[:b].detach().clone()) for b in rungs])
        self.bias = nn.Parameter(shared.bias.detach().reshape(1, -1).repeat(len(rungs), 1))

    def forward(self, x: torch.Tensor, budget: int | None = None) -> torch.Tensor:
        return self.at_rung(x, rung(budget, x.shape[1]))

    def at_rung(self, x: torch.Tensor, r: int) -> torch.Tensor:
        w = self.weight[r]
        return F.conv_transpose2d(x[:, :w.shape[0]], w, self.bias[r], self.stride, self.padding)


class PrefixDecoder(Decoder):
    """The decoder of any-budget models: its BatchNorm keeps running statistics per budget rung (RungBatchNorm),
    chosen by how many channels arrived. Its initial weights are the gated decoder's (BN draws nothing);
    `per_rung`: its deconvolution too is one per rung (RungDeconv), starting from the same weights.

    Each training forward at budget b also gives every rung up to b its statistics: the deconvolution is
    linear, so the outputs for the prefixes 1, 2, 4, ... are cumulative sums of the contributions of their
    channel groups, one extra deconvolution's worth of work (no gradient); per rung, each rung's own output
    (about two deconvolutions' worth)."""

    def __init__(self, channels: int, resolution: int = 1, relu: bool = True, per_rung: bool = False) -> None:
        super().__init__(channels, resolution, relu=relu)
        self.bn = RungBatchNorm(channels, channels)
        if per_rung:
            self.deconv = RungDeconv(self.deconv)

    def forward(self, x: torch.Tensor, budget: int | None = None) -> torch.Tensor:
        if self.training:
            self.bn.track(self._rung_outputs(x, x.shape[1] if budget is None else budget))
        y = self.deconv(x, budget) if isinstance(self.deconv, RungDeconv) else self.deconv(x)
        return self.relu(self.bn(y, budget))

    @torch.no_grad()
    def _rung_outputs(self, x: torch.Tensor, budget: int) -> list[torch.Tensor]:
        """The deconvolution's output for each prefix of the ladder up to `budget` (the rungs it can serve)."""
        d = self.deconv
        rungs = [high for high in ladder(x.shape[1]) if high <= budget]
        if isinstance(d, RungDeconv):
            return [d.at_rung(x, r) for r in range(len(rungs))]
        out, low, total = [], 0, d.bias.view(1, -1, 1, 1)
        for high in rungs:
            total = total + F.conv_transpose2d(x[:, low:high], d.weight[low:high], None, d.stride, d.padding)
            out.append(total)
            low = high
        return out
