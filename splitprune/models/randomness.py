"""The process's one torch CPU random generator, shared by every half a server hosts.

Dropout, initialisation, sandwich draws and gate resets draw from torch's global CPU generator, and a party's
own stream is swapped into it around its code (training.rng.RngStream). Threads serving different tenants
would swap and draw in between each other, so one tenant's traffic would change another's model: every piece
of code that reseeds, swaps or forks the global generator holds RNG_LOCK (re-entrant) for as long as it uses it.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch

RNG_LOCK = threading.RLock()


@contextmanager
def private_rng(seed: int | None = None) -> Iterator[None]:
    """Draws inside leave the global generator as it was (seeded from `seed` first, if given)."""
    with RNG_LOCK, torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        yield
