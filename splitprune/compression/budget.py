"""The channel budget: soft count of open channels, the two-sided budget loss, exact top-B, the reset rule."""
from __future__ import annotations

import torch


def channel_mask(gate_logits: torch.Tensor) -> torch.Tensor:
    """mask_c = sigmoid(p_c)^2, flattened to [C]."""
    return torch.sigmoid(gate_logits.reshape(-1)) ** 2


def soft_count(gate_logits: torch.Tensor) -> torch.Tensor:
    """S = sum_c mask_c: how many channels are open, softly."""
    return channel_mask(gate_logits).sum()


def budget_loss(gate_logits: torch.Tensor, budget: int, eps: float = 1000.0, delta: float = 0.01) -> torch.Tensor:
    """eps * (exp(delta (S - B)) + exp(-delta (S - B))): pulls the soft count S towards B from both sides."""
    gap = delta * (soft_count(gate_logits) - budget)
    return eps * (torch.exp(gap) + torch.exp(-gap))


def select_top_b(mask: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices (ascending) of the `budget` largest mask values; never more than `budget`, ties to the lower index.

    A stable descending sort makes ties deterministic, which torch.topk does not promise.
    """
    order = torch.argsort(mask.detach(), descending=True, stable=True)
    return order[:budget].sort().values


def keep_channels(z: torch.Tensor, channels: torch.Tensor | None, mask: torch.Tensor, scaling: str) -> torch.Tensor:
    """The kept channels [N, K, H, W] of z; "paper" scaling also multiplies each by its mask value."""
    kept = z if channels is None else z.index_select(1, channels)
    if scaling == "paper":
        weights = mask if channels is None else mask.index_select(0, channels)
        kept = kept * weights.view(1, -1, 1, 1)
    return kept


@torch.no_grad()
def reset_gate(gate_logits: torch.Tensor, threshold: float = 0.9, low_max: float = 3.0, high: float = 15.0,
               generator: torch.Generator | None = None) -> int:
    """The deprune reset: channels with p_c < threshold get U(0, low_max), the others `high`.

    Returns how many channels were at or above the threshold (kept wide open).
    """
    flat = gate_logits.view(-1)
    closed = flat < threshold
    fresh = (torch.rand(flat.shape, generator=generator, dtype=flat.dtype) * low_max).to(flat.device)
    flat.copy_(torch.where(closed, fresh, torch.full_like(flat, high)))
    return int((~closed).sum())
