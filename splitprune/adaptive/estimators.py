"""Rate estimates that learn from every request, not only from pairs of sizes (torch-free, no clock).

The controller's own fit (``"pairs"``, controller.py) measures the rate only from requests whose sizes differ:
while it holds one option it learns nothing and its last fit freezes. Replayed over real 3G traces that froze
0.49 Mbit/s for 8 s while the link ran at 2.6-3.1, and no rise of 2x or more was answered within 1 s. Here
every clean request is a throughput sample: its bytes over its time on the link minus the round trip,
``size / (network - rtt)``; the round trip is the controller's (the intercept of its last fit over pairs of
sizes, lowered by any request quicker than it). Two estimators from the video-streaming literature, each asked for a seconds-per-byte at a size:

- ``"harmonic"`` (RobustMPC, Yin et al., SIGCOMM 2015): the harmonic mean of the last ``samples`` throughputs,
  discounted by the largest relative error of the recent transfer-time predictions (``1 + err``, err capped at
  ``max_error``): a link that surprised us lately is trusted less.
- ``"sized"`` (size-conditioned, after Fugu, Yan et al., NSDI 2020, without its neural network): the
  transfer time of a size is predicted from the recent requests of the nearest sizes (median of their seconds
  per byte), so small messages, whose time is mostly fixed costs, do not set the rate of large ones.

A transfer time below ``min_transfer`` (a few ms: the jitter of one request) is no sample: the request was too
small for its transfer to show (read as ``min_transfer`` instead, 70 B requests said "0.28 Mbit/s" on any link,
and a harmonic mean of them never let the controller step up: 0 of 198 rises answered on held-out traces).
"""
from __future__ import annotations

import collections
import math
import statistics
from typing import Protocol

from splitprune.errors import UserError

ESTIMATORS = ("pairs", "harmonic", "sized")


class RateEstimator(Protocol):
    def add(self, size: int, transfer: float) -> None:
        """A clean request's bytes and its seconds on the link beyond the round trip."""

    def per_byte(self, size: int) -> float | None:
        """Seconds per byte predicted for a message of `size` bytes; None before any sample."""


class HarmonicRate:
    """RobustMPC's estimate (module docstring)."""

    def __init__(self, samples: int = 5, min_transfer: float = 0.002, max_error: float = 1.0) -> None:
        self.min_transfer, self.max_error = min_transfer, max_error
        self._rates: collections.deque = collections.deque(maxlen=samples)
        self._errors: collections.deque = collections.deque(maxlen=samples)

    def add(self, size: int, transfer: float) -> None:
        if transfer < self.min_transfer:
            return
        if self._rates:   # the error of the plain estimate: of the discounted one it would sustain itself
            self._errors.append(abs(max(size, 1) / self._harmonic() - transfer) / transfer)
        self._rates.append(max(size, 1) / transfer)

    def _harmonic(self) -> float:
        return len(self._rates) / sum(1.0 / r for r in self._rates)

    def per_byte(self, size: int) -> float | None:
        if not self._rates:
            return None
        error = min(max(self._errors, default=0.0), self.max_error)
        return (1.0 + error) / self._harmonic()


class SizedRate:
    """A size-conditioned transfer-time predictor (module docstring)."""

    def __init__(self, samples: int = 16, nearest: int = 5, min_transfer: float = 0.002) -> None:
        self.nearest, self.min_transfer = nearest, min_transfer
        self._points: collections.deque = collections.deque(maxlen=samples)   # (log size, seconds per byte)

    def add(self, size: int, transfer: float) -> None:
        if transfer < self.min_transfer:
            return
        size = max(size, 1)
        self._points.append((math.log(size), transfer / size))

    def per_byte(self, size: int) -> float | None:
        if not self._points:
            return None
        at = math.log(max(size, 1))
        # the most recent first among equally near ones: the link changes, the sizes repeat
        ranked = sorted(enumerate(self._points), key=lambda p: (abs(p[1][0] - at), -p[0]))
        return statistics.median(pb for _, (_, pb) in ranked[:self.nearest])


def make_estimator(name: str) -> RateEstimator | None:
    """The estimator of `name`; None for "pairs" (the controller's own fit over pairs of sizes)."""
    if name == "harmonic":
        return HarmonicRate()
    if name == "sized":
        return SizedRate()
    if name == "pairs":
        return None
    raise UserError(f"unknown rate estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")
