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
