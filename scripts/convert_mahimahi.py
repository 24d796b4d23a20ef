"""Convert Mahimahi's cellular packet-delivery traces into splitprune link traces (seconds,rate_mbit,delay_ms).

    python scripts/convert_mahimahi.py MAHIMAHI_TRACES_DIR [--out bench_results/traces/mahimahi]

Source: the `traces/` folder of Mahimahi (https://github.com/ravinet/mahimahi, GPL-3.0; recorded with the
Saturator of Winstein, Sivaraman and Balakrishnan, "Stochastic Forecasts Achieve High Throughput and Low Delay
over Cellular Networks", NSDI 2013). Each line of a Mahimahi trace is a millisecond at which one 1500-byte packet
may cross the link. Our requests go up, so the uplink (`.up`) files are used: packets per second give the rate
of each second (a second with none gets one packet's worth, 0.012 Mbit/s: our traces need a rate > 0); the
traces carry no delay, so every row gets a 40 ms one-way delay (an 80 ms round trip, typical of LTE).

Two 120 s segments of each long drive: the first ("select") is where controller settings may be chosen, the
second ("test") only reports; the two short recordings are test segments whole.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DELAY_MS = 40.0
FLOOR_MBIT = 1500 * 8 / 1e6
# (file, first second, seconds, role)
SEGMENTS = [("ATT-LTE-driving", 0, 120, "select"), ("ATT-LTE-driving", 120, 120, "test"),
            ("TMobile-UMTS-driving", 0, 120, "select"), ("TMobile-UMTS-driving", 120, 120, "test"),
            ("Verizon-EVDO-driving", 0, 120, "select"), ("Verizon-EVDO-driving", 120, 120, "test"),
            ("Verizon-LTE-short", 0, 140, "test"), ("ATT-LTE-driving-2016", 0, 120, "test")]


def per_second(path: Path) -> list[float]:
    stamps = [int(line) for line in path.read_text().split() if line.strip()]
    counts = collections.Counter(ms // 1000 for ms in stamps)
    return [max(counts.get(s, 0) * 1500 * 8 / 1e6, FLOOR_MBIT) for s in range(max(counts) + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", type=Path, help="Mahimahi's traces/ folder (with the .up files)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results/traces/mahimahi")
    args = parser.parse_args()
    missing = sorted({f"{name}.up" for name, *_ in SEGMENTS if not (args.traces / f"{name}.up").is_file()})
    if missing:
        sys.exit(f"error: {args.traces}: no {', '.join(missing)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, start, seconds, role in SEGMENTS:
        rates = per_second(args.traces / f"{name}.up")[start:start + seconds]
        head = [f"# {name}.up seconds {start}-{start + len(rates)} of Mahimahi's traces (github.com/ravinet/mahimahi,",
                "# GPL-3.0; Winstein et al., NSDI 2013): packets per second, 40 ms one-way delay added.",
                f"# role: {role} (settings may be chosen on 'select' segments only)",
                "# regenerate: python scripts/convert_mahimahi.py MAHIMAHI/traces", "seconds,rate_mbit,delay_ms"]
        rows = [f"{t},{rate:.3f},{DELAY_MS:g}" for t, rate in enumerate(rates)]
        (args.out / f"{role}-{name}-{start}.csv").write_text("\n".join(head + rows) + "\n")
        print(f"{role}-{name}-{start}.csv: {len(rates)} s, median {sorted(rates)[len(rates) // 2]:.2f} Mbit/s")


if __name__ == "__main__":
    main()
