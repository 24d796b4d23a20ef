"""A learned prior on dtype ec's grid, for the rate term of training (`--rate-lambda`).

Each channel (`--ec-prior position`: each channel at each position of the cut) has a categorical distribution
over the L+1 grid levels (softmax of learnable logits). In
training the grid value L*y gets uniform noise in [-1/2, 1/2] (the usual stand-in for rounding, as in
CompressAI's EntropyBottleneck), and its probability is interpolated linearly between the two levels around
it, so the rate has a gradient towards likelier levels as well as one for the logits. The rate is in bits
per sample; the frozen tables the wire uses are still counted on the training set at the end (tables.py).
"""
from __future__ import annotations

import torch
from torch import nn

from splitprune.wire.entropy import EC_LEVELS


class GridPrior(nn.Module):
    def __init__(self, channels: int, levels: int = EC_LEVELS, positions: int = 1) -> None:
        super().__init__()
        self.levels, self.positions = levels, positions
        shape = (channels, levels + 1) if positions == 1 else (channels, positions, levels + 1)
        self.logits = nn.Parameter(torch.zeros(shape))

    def bits(self, kept: torch.Tensor, channels: torch.Tensor | None, generator: torch.Generator | None = None
             ) -> torch.Tensor:
        """Bits per sample of kept [N, K, H, W] (values in [0, 1]) of the channels `channels` (None: all)."""
        n, k, h, w = kept.shape
        if self.positions not in (1, h * w):
            raise ValueError(f"a prior over {self.positions} positions cannot code a {h}x{w} cut")
        u = kept * self.levels
        if self.training:
            u = u + torch.rand(u.shape, generator=generator, dtype=u.dtype).to(u.device) - 0.5
        u = u.clamp(0, self.levels)
        low = u.detach().floor().clamp(max=self.levels - 1)
        frac = u - low
        logits = self.logits if channels is None else self.logits.index_select(0, channels)
        probs = torch.softmax(logits, dim=-1).reshape(k, -1)                 # [K, P * (L+1)]
        index = low.long().permute(1, 0, 2, 3).reshape(k, -1)                 # [K, N*H*W], positions last
        if self.positions > 1:
            index = index + torch.arange(n * h * w, device=index.device) % self.positions * (self.levels + 1)
        p_low = probs.gather(1, index)
        p_high = probs.gather(1, index + 1)
        f = frac.permute(1, 0, 2, 3).reshape(k, -1)
        p = (1 - f) * p_low + f * p_high
        return -torch.log2(p.clamp_min(1e-9)).sum() / n
