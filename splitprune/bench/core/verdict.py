"""The one verdict rule of every benchmark claim, with the noise counted against us.

A measured quantity is an interval [low, high]: the worst and best of its seeds (each seed's number
measured on the model the run ends with), widened by any extra noise named. Against a target
"value >= need":

- holds:        low >= need   (met even by the worse of the seeds, minus the noise)
- fails:        high < need   (missed even by the better of the seeds, plus the noise)
- not resolved: otherwise     (the noise straddles the target)

A difference between two runs A - B is the interval [min(A) - max(B), max(A) - min(B)]: seeds are not
paired, so the verdict holds for any pairing. A target "value <= need" is the same rule on -value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

HOLDS, FAILS, NOT_RESOLVED, NOT_MEASURED = "holds", "fails", "not resolved", "not measured"


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    @property
    def mid(self) -> float:
        return (self.low + self.high) / 2

    @property
    def spread(self) -> float:
        return self.high - self.low

    def text(self, scale: float = 100.0, unit: str = " pt", signed: bool = True) -> str:
        sign = "+" if signed else ""
        if self.spread == 0:
            return f"{scale * self.low:{sign}.2f}{unit}"
        return f"{scale * self.low:{sign}.2f} to {scale * self.high:{sign}.2f}{unit}"


def interval(values: Sequence[float | None], noise: float = 0.0) -> Interval | None:
    """[min - noise, max + noise] of the measured values; None if any is missing."""
    if not values or any(v is None for v in values):
        return None
    return Interval(min(values) - noise, max(values) + noise)


def binomial(share: float, trials: int, z: float = 1.0) -> Interval | None:
    """A share of `trials` (e.g. requests within their latency target) as its Wilson score interval, `z`
    standard errors wide. Unlike share +- one standard error it does not shrink to a point at 0 or 1: no
    late request among 1,000 does not show that none would be late among 10,000."""
    if trials <= 0:
        return None
    scale = 1 + z * z / trials
    centre = (share + z * z / (2 * trials)) / scale
    half = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials)) / scale
    return Interval(max(0.0, centre - half), min(1.0, centre + half))


def paired(differences: Sequence[float], z: float = 1.0) -> Interval | None:
    """The mean of per-item differences between two things measured on the same items (e.g. two policies'
    correctness on each test image), +- `z` standard errors of that mean: the items' own difficulty cancels,
    which two independent binomial errors would count twice."""
    n = len(differences)
    if n == 0:
        return None
    mean = sum(differences) / n
    spread = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1) / n) if n > 1 else 0.0
    return Interval(mean - z * spread, mean + z * spread)


def difference(a: Interval | None, b: Interval | None) -> Interval | None:
    """A - B over every pairing of their seeds."""
    if a is None or b is None:
        return None
    return Interval(a.low - b.high, a.high - b.low)


def verdict(value: Interval | None, need: float) -> str:
    """holds / fails / not resolved for the target value >= need (see the module docstring)."""
    if value is None:
        return NOT_MEASURED
    if value.low >= need:
        return HOLDS
    if value.high < need:
        return FAILS
    return NOT_RESOLVED


def at_most(value: Interval | None, limit: float) -> str:
    """The same rule for the target value <= limit."""
    return verdict(None if value is None else Interval(-value.high, -value.low), -limit)


def explain(value: Interval | None, need: float, name: str = "") -> str:
    """'VERDICT (NAME LOW..HIGH against NEED)': the verdict with the numbers a reader checks it by."""
    result = verdict(value, need)
    if value is None:
        return result
    label = f"{name} " if name else ""
    return f"{result} ({label}{value.text()} against {100 * need:+.2f} pt)"
