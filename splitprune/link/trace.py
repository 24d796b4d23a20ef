"""Link traces: a rate and delay schedule over time that `splitprune link --trace` replays.

A trace file is CSV with the header ``seconds,rate_mbit,delay_ms`` and one row per change: from
``seconds`` on (time since the link started), each direction runs at ``rate_mbit`` (1 Mbit = 10^6 bit)
with a one-way delay of ``delay_ms``, until the next row. The first row is at 0 s; after the last row
the trace holds its values. Lines starting with ``#`` are comments (the shipped traces say where they
come from). Built-in traces (``steady``, ``step-down``, ``wifi-walk``, ``cellular-fades``) are named
without a path; ``scripts/make_traces.py`` regenerates them.
"""
from __future__ import annotations

import bisect
import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from splitprune.errors import UserError

HEADER = ("seconds", "rate_mbit", "delay_ms")
BUILTIN_DIR = Path(__file__).with_name("traces")
MAX_ROWS = 100_000
MAX_FILE_BYTES = 8 * 1024 * 1024


def builtin_traces() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.csv"))


@dataclass(frozen=True)
class LinkTrace:
    """A piecewise-constant schedule: row i holds from ``times[i]`` until ``times[i+1]``."""

    times: tuple[float, ...]        # seconds, strictly increasing, times[0] == 0
    rates: tuple[float, ...]        # bytes per second per direction, > 0
    delays: tuple[float, ...]       # one-way delay, seconds, >= 0
    name: str = "trace"

    def __post_init__(self) -> None:
        if not (len(self.times) == len(self.rates) == len(self.delays) >= 1):
            raise UserError("a link trace needs at least one row, with a rate and a delay for each time")
        if self.times[0] != 0:
            raise UserError(f"trace {self.name}: the first row must be at 0 seconds, not {self.times[0]:g}")

    @classmethod
    def from_rows(cls, rows: list[tuple[float, float, float]], name: str = "trace") -> "LinkTrace":
        """Rows of (seconds, rate Mbit/s, delay ms), checked."""
        if not rows:
            raise UserError(f"trace {name}: no rows")
        if len(rows) > MAX_ROWS:
            raise UserError(f"trace {name}: {len(rows)} rows, at most {MAX_ROWS}")
        last = -math.inf
        for i, (t, rate, delay) in enumerate(rows, start=1):
            where = f"trace {name}, row {i}"
            for label, value in zip(HEADER, (t, rate, delay)):
                if not math.isfinite(value):
                    raise UserError(f"{where}: {label} must be a finite number, got {value}")
            if t <= last:
                raise UserError(f"{where}: seconds must increase from row to row ({t:g} after {last:g})")
            if rate <= 0:
                raise UserError(f"{where}: rate_mbit must be > 0, got {rate:g}")
            if delay < 0:
                raise UserError(f"{where}: delay_ms must be >= 0, got {delay:g}")
            last = t
        return cls(tuple(float(r[0]) for r in rows), tuple(float(r[1]) * 1e6 / 8 for r in rows),
                   tuple(float(r[2]) / 1000 for r in rows), name)

    @classmethod
    def parse(cls, text: str, name: str = "trace") -> "LinkTrace":
        lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not lines:
            raise UserError(f"trace {name}: empty (expected the header {','.join(HEADER)} and rows)")
        reader = csv.reader(io.StringIO("\n".join(lines)))
        header = tuple(cell.strip().lower() for cell in next(reader))
        if header != HEADER:
            raise UserError(f"trace {name}: the first line must be the header {','.join(HEADER)}, got {','.join(header)}")
        rows = []
        for line_no, cells in enumerate(reader, start=2):
            if len(cells) != len(HEADER):
                raise UserError(f"trace {name}, data line {line_no}: expected 3 values "
                                f"({','.join(HEADER)}), got {len(cells)}")
            try:
                rows.append(tuple(float(cell) for cell in cells))
            except ValueError:
                raise UserError(f"trace {name}, data line {line_no}: {','.join(cells)!r} is not three numbers") from None
        return cls.from_rows(rows, name)

    @classmethod
    def load(cls, spec: str | Path) -> "LinkTrace":
        """A built-in trace by name, or a CSV file by path."""
        path = Path(spec)
        if not path.exists() and str(spec) in builtin_traces():
            path = BUILTIN_DIR / f"{spec}.csv"
        if not path.is_file():
            raise UserError(f"trace {spec}: no such file, and not a built-in trace "
                            f"({', '.join(builtin_traces())})")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise UserError(f"trace {spec}: larger than {MAX_FILE_BYTES // 2**20} MiB")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"trace {spec}: cannot read it: {exc}") from None
        return cls.parse(text, path.stem)

    # ---------------------------------------------------------------- queries (t: seconds since start)
    @property
    def duration(self) -> float:
        """When the last row starts (the trace holds it after that)."""
        return self.times[-1]

    def _row(self, t: float) -> int:
        return max(0, bisect.bisect_right(self.times, t) - 1)

    def rate_at(self, t: float) -> float:
        return self.rates[self._row(t)]

    def delay_at(self, t: float) -> float:
        return self.delays[self._row(t)]

    def finish(self, start: float, nbytes: float) -> float:
        """When `nbytes` whose serialization starts at `start` are serialized, the rate changing as it goes."""
        i = self._row(start)
        t = start
        left = float(nbytes)
        while i + 1 < len(self.times):
            room = (self.times[i + 1] - t) * self.rates[i]
            if left <= room:
                break
            left -= room
            t = self.times[i + 1]
            i += 1
        return t + left / self.rates[i]

    def mbit_at(self, t: float) -> float:
        return self.rate_at(t) * 8 / 1e6

    def describe(self) -> str:
        mbit = [r * 8 / 1e6 for r in self.rates]
        ms = [d * 1000 for d in self.delays]
        return (f"trace {self.name}: {len(self.times)} rows over {self.duration:g} s, "
                f"{min(mbit):g}-{max(mbit):g} Mbit/s, {min(ms):g}-{max(ms):g} ms one-way")
