"""What the server half minimises on the channels it received: plain cross-entropy (every gated method), or
the any-budget loss over nested prefixes of them.

Any-budget training (method anybudget) makes the first B channels a good code for every B at once. The device
sends the prefix of its current budget (channels 0..K-1); the server computes the loss at several nested
prefixes of what it received, the channels beyond each prefix zeroed (the receiver's view of a device that
sent only that prefix), sums those losses and returns ONE gradient for the K received channels. So the
refinement costs server compute (one forward and backward per prefix), never traffic. Budgets come from the
ladder 1, 2, 4, ... (powers of two below K) plus K itself; random draws use the server's seeded RngStream,
active around the call, so a run over the network draws what an in-process run draws.

- "sandwich" (the default): the whole received prefix (K), the smallest (1) and one budget drawn from the
  ladder strictly between them, their label losses summed, not averaged (each prefix's gradient at full
  weight, as in slimmable networks, Yu & Huang, ICCV 2019). Slimmable networks' in-place distillation (the
  smaller prefixes learning from the whole one's predictions) lost 0.3-2.5 pt at every budget below all
  on validation data (docs/design.md).
- "sandwich4": the same with two distinct budgets drawn from between: each budget of the ladder trained twice
  as often, for a fourth pass per step.
- "random": plain nested (ordered) dropout, one ladder budget up to K drawn per step.

A step reports the loss it minimises (the sum) and the accuracy at the largest prefix it trained on.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from splitprune.compression.rungs import ladder
from splitprune.compression.codec import Decoded
from splitprune.config import NESTED_SAMPLINGS
from splitprune.wire.refusals import BadTensor

SAMPLINGS = NESTED_SAMPLINGS


class Objective(Protocol):
    """The server's loss on a received batch: (loss to backpropagate, logits reported as the step's)."""

    passes: int  # most forward passes of the server half per step (each kept for the backward)

    def __call__(self, half: torch.nn.Module, received: Decoded, compact: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class CrossEntropy:
    """Cross-entropy on the received channels scattered into zeros: the gated methods' one forward."""

    passes = 1

    def __call__(self, half: torch.nn.Module, received: Decoded, compact: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        partial = received.channels.numel() < received.num_channels
        logits = half(received.dense() if partial else compact)
        return F.cross_entropy(logits, labels), logits


def prefix_input(compact: torch.Tensor, budget: int, channels: int) -> torch.Tensor:
    """The first `budget` received channels, the other channels up to C zeros: [N, C, H, W]."""
    if budget == channels == compact.shape[1]:
        return compact
    n, _, h, w = compact.shape
    kept = compact[:, :budget]
    return torch.cat([kept, kept.new_zeros(n, channels - budget, h, w)], 1)


class NestedPrefixes:
    """The any-budget objective (module docstring): the summed loss at nested prefixes of the received ones."""

    def __init__(self, sampling: str = "sandwich") -> None:
        if sampling not in SAMPLINGS:
            raise ValueError(f"unknown nested sampling {sampling!r}; choose one of {', '.join(SAMPLINGS)}")
        self.sampling = sampling
        self.middles = {"sandwich": 1, "sandwich4": 2}.get(sampling, 0)
        self.passes = 2 + self.middles if self.middles else 1

    def budgets(self, received: int) -> list[int]:
        """This step's prefixes, largest first; draws from the active random state."""
        rungs = ladder(received)
        if self.sampling == "random":
            return [rungs[int(torch.randint(len(rungs), ()))]]
        between = rungs[1:-1]
        if self.middles == 1 or len(between) <= 1:   # one draw: what runs made before sandwich4 drew
            middle = [between[int(torch.randint(len(between), ()))]] if between else []
        else:
            middle = [between[int(i)] for i in torch.randperm(len(between))[:self.middles]]
        return sorted({received, *middle, 1}, reverse=True)

    def __call__(self, half: torch.nn.Module, received: Decoded, compact: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = compact.shape[1]
        if not torch.equal(received.channels.cpu(), torch.arange(k)):
            raise BadTensor(f"this any-budget model takes a prefix of its channels (0..K-1), not channels "
                            f"{received.channels[:8].tolist()}...")
        # largest first: the step reports its logits
        logits = [half(prefix_input(compact, b, received.num_channels), b) for b in self.budgets(k)]
        return torch.stack([F.cross_entropy(z, labels) for z in logits]).sum(), logits[0]
