"""Per-party random streams, so the device and the server draw the same numbers in-process and over a network."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from splitprune.models.randomness import RNG_LOCK


class RngStream:
    """A CPU random state of its own, swapped in around the code of one party (dropout, init, resets); the
    process's generator is held (RNG_LOCK) while it is swapped in, so parties in other threads never draw from
    this one's state, nor this one from theirs."""

    def __init__(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.state = gen.get_state()

    @contextmanager
    def active(self) -> Iterator[None]:
        with RNG_LOCK:
            outer = torch.get_rng_state()
            torch.set_rng_state(self.state)
            try:
                yield
            finally:
                self.state = torch.get_rng_state()
                torch.set_rng_state(outer)
