"""Regenerate the built-in link traces in splitprune/link/traces/ (deterministic, seeded).

    python scripts/make_traces.py

All four are synthetic: no packet trace is shipped or downloaded. Their shapes follow what public
measurements report, and each file's header says which; the numbers themselves come from the models below.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "splitprune" / "link" / "traces"


def write(name: str, source: str, rows: list[tuple[float, float, float]]) -> None:
    lines = [f"# {line}" for line in source.strip().splitlines()]
    lines += ["# regenerate: python scripts/make_traces.py", "seconds,rate_mbit,delay_ms"]
    lines += [f"{t:g},{rate:.3f},{delay:.1f}" for t, rate, delay in rows]
    (OUT / f"{name}.csv").write_text("\n".join(lines) + "\n")


def steady() -> list[tuple[float, float, float]]:
    return [(0, 10.0, 20.0)]


def step_down() -> list[tuple[float, float, float]]:
    return [(0, 20.0, 20.0), (20, 1.0, 20.0)]


def wifi_walk(seed: int = 1, seconds: float = 90, step: float = 0.5) -> list[tuple[float, float, float]]:
    """Someone walking around an office with a phone: rate swings ~10x over a few seconds."""
    rng = random.Random(seed)
    rows, noise = [], 0.0
    for i in range(int(seconds / step)):
        t = i * step
        noise = 0.8 * noise + rng.gauss(0, 0.15)          # AR(1) shadowing on top of the walk
        log_rate = math.log(6.0) + 1.25 * math.sin(2 * math.pi * t / 14.0) + noise
        rate = min(40.0, max(0.8, math.exp(log_rate)))
        delay = 4.0 + 6.0 / math.sqrt(rate) + abs(rng.gauss(0, 1.0))
        rows.append((t, rate, delay))
    return rows


def cellular_fades(seed: int = 2, seconds: float = 120, step: float = 0.25) -> list[tuple[float, float, float]]:
    """A mobile cellular link: a wandering rate with deep fades of 1-3 s every 12-25 s."""
    rng = random.Random(seed)
    rows, noise = [], 0.0
    next_fade, fade_end, fade_rate = rng.uniform(8, 15), -1.0, 1.0
    for i in range(int(seconds / step)):
        t = i * step
        noise = 0.9 * noise + rng.gauss(0, 0.12)
        rate = min(15.0, max(1.0, 8.0 * math.exp(noise)))
        delay = 35.0 + rng.uniform(0, 10)
        if t >= next_fade:
            fade_end = t + rng.uniform(1.0, 3.0)
            fade_rate = rng.uniform(0.1, 0.3)
            next_fade = fade_end + rng.uniform(12, 25)
        if t < fade_end:
            rate, delay = fade_rate, delay + 40.0
        rows.append((t, rate, delay))
    return rows


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    write("steady", "A steady link: 10 Mbit/s, 20 ms one way (a good home Wi-Fi or wired edge link).", steady())
    write("step-down", "A step down from 20 to 1 Mbit/s at 20 s (walking out of an access point's room);\n"
          "20 ms one way throughout.", step_down())
    write("wifi-walk", "Synthetic 'walking around on Wi-Fi': the rate swings between ~1.5 and ~38 Mbit/s over\n"
          "a 14 s period with correlated shadowing, as indoor Wi-Fi throughput measurements of walking users\n"
          "report (about 10x within seconds); delay 4-12 ms, higher when the rate is low.", wifi_walk())
    write("cellular-fades", "Synthetic cellular link with deep fades: a wandering 1-15 Mbit/s rate (AR(1) in log rate)\n"
          "and, every 12-25 s, a 1-3 s fade to 0.1-0.3 Mbit/s with +40 ms delay, the pattern reported by LTE\n"
          "drive measurements (e.g. the traces of Winstein et al., 'Sprout', NSDI 2013); 35-45 ms one way.",
          cellular_fades())


if __name__ == "__main__":
    main()
