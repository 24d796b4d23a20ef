"""What the emulated link looks like: a fixed rate and delay (LinkProfile), or a trace over time; the byte
counters a proxy reports (LinkCounters); and the schedule both give a proxy over its loop's clock."""
from __future__ import annotations

import math
from dataclasses import dataclass

from splitprune.errors import UserError
from splitprune.link.trace import LinkTrace


def _finite_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise UserError(f"{name} must be finite, got {value}")
    return value


@dataclass(frozen=True)
class LinkProfile:
    """What one direction of the emulated link looks like (both directions get the same profile)."""

    rate_mbit: float | None = None  # per direction, 1 Mbit = 1e6 bit; None = unlimited
    delay_ms: float = 0.0  # one-way propagation delay added to each direction
    jitter_ms: float = 0.0  # uniform +-jitter on the delay; never reorders bytes

    def __post_init__(self) -> None:
        if self.rate_mbit is not None:
            rate = _finite_number("rate_mbit", self.rate_mbit)
            if rate <= 0:
                raise UserError(f"rate_mbit must be > 0 (or None for unlimited), got {self.rate_mbit}")
        delay = _finite_number("delay_ms", self.delay_ms)
        jitter = _finite_number("jitter_ms", self.jitter_ms)
        if delay < 0:
            raise UserError(f"delay_ms must be >= 0, got {self.delay_ms}")
        if jitter < 0:
            raise UserError(f"jitter_ms must be >= 0, got {self.jitter_ms}")
        if jitter > delay:
            raise UserError(f"jitter_ms ({self.jitter_ms}) must not exceed delay_ms ({self.delay_ms})")

    @property
    def rate_bytes_per_s(self) -> float | None:
        return None if self.rate_mbit is None else float(self.rate_mbit) * 1e6 / 8.0

    def describe(self) -> str:
        rate = "unlimited" if self.rate_mbit is None else f"{self.rate_mbit:g} Mbit/s"
        text = f"{rate} per direction, {self.delay_ms:g} ms one-way delay"
        if self.jitter_ms:
            text += f" +-{self.jitter_ms:g} ms jitter"
        return text


@dataclass
class LinkCounters:
    """A snapshot of bytes delivered per direction and connections accepted since start()."""

    bytes_up: int = 0  # client -> upstream
    bytes_down: int = 0  # upstream -> client
    connections: int = 0


class _Schedule:
    """Rate and delay over loop time: constant (a LinkProfile) or following a LinkTrace from `t0`."""

    def __init__(self, profile: LinkProfile, trace: LinkTrace | None, t0: float):
        self.trace = trace
        self.t0 = t0
        self.rate = profile.rate_bytes_per_s
        self.delay = profile.delay_ms / 1000.0
        self.max_rate = max(trace.rates) if trace is not None else self.rate  # None = unlimited

    def rate_at(self, now: float) -> float:
        return self.trace.rate_at(now - self.t0) if self.trace is not None else self.rate

    def delay_at(self, when: float) -> float:
        return self.trace.delay_at(when - self.t0) if self.trace is not None else self.delay

    def finish(self, start: float, nbytes: int) -> float:
        if self.trace is None:
            return start + nbytes / self.rate
        return self.t0 + self.trace.finish(start - self.t0, nbytes)
