"""Replay `--budget auto`'s controller on held-out link traces, for settings chosen without the shipped ones.

    python scripts/controller_heldout.py [--out bench_results/adaptive/controller_heldout.json]

The shipped traces are the benchmark's test set; a controller setting read off them would lean our way. This
replays the controller (splitprune.adaptive.replay, with the stream's warm-up) on traces drawn by the same
generators as the shipped ones with other seeds (scripts/make_traces.py), plus steady links and step-downs at
other times and rates, with the model's option accuracies (bench_results/adaptive/inference) and the
per-request residual latencies of EVERY recorded real cellular-fades run (bench_results/adaptive/residuals/,
one CSV per run; the latest bench run's is added there first). One run's residuals moved the choice from run
to run (settle 2 s against 5 s, the worst share between 98.9 and 99.3 %); pooled, a setting is judged by its
worst share and mean gap over every run and trace. Per setting, run and trace: the share of requests within
the target, the accuracy against the oracle's, and option switches per 100 requests (oscillation).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import make_traces  # noqa: E402

from splitprune.adaptive.controller import Option  # noqa: E402
from splitprune.adaptive.replay import (Measured, controller_replay, measured, oracle, reaction_stats, reactions,
                                        replay, score, switches_per_100)
from splitprune.link.trace import LinkTrace

# settle None: no settled step up (every step up within up_margin), as before it existed. Session 16 chose
# safety 0.85 / up_margin 0.7 from the first five (the same worst share within the target as the old 0.8 / 0.6,
# about a third of its mean gap to the oracle, no oscillation on steady links); the next session added the
# settled step up and chose settle 5 s from the last four (with 0.85 / 0.7): of the settings that keep 99% of
# the requests within the target on every held-out trace, the smallest mean gap to the oracle (settle 2 s had a
# smaller gap but 98.9% on one trace). Pooled over five recorded runs' residuals (session 18), settle 5 s is the
# only setting that keeps 99% on every run and trace at 200 ms (99.1% at worst; the others 98.7-98.9%, a
# request or two in a thousand): the choice stands. Session 20 made a step up within the up margin jump to the
# best option of at most `growth` times the bytes (it went one option at a time) and stopped restarting the
# hold while the smallest option misses too. At 200 ms, growth 4 (the default: the rows without "growth")
# reached the oracle's option 0.89 s (median) after a rise of 2x or more, against 1.69 s one option at a time
# (growth 1; 2.48 s with the hold restarted too, as before) and 1.45 s with growth 2; the mean gap to the
# oracle -0.029 pt against -0.040, steady-link switches 1.65 per 100 requests against 2.13; the pooled share
# in time 99.77 % against 99.78 % (the worst run and trace 98.8 % either way; 99.0 % with growth 2).
# Growth 8 moved nothing further. So growth 4.
SETTINGS = [{"safety": 0.8, "up_margin": 0.6, "settle": None}, {"safety": 0.8, "up_margin": 0.7, "settle": None},
            {"safety": 0.8, "up_margin": 0.75, "settle": None}, {"safety": 0.85, "up_margin": 0.7, "settle": None},
            {"safety": 0.9, "up_margin": 0.85, "settle": None},
            *({"safety": 0.85, "up_margin": 0.7, "settle": t} for t in (2.0, 5.0, 10.0, 20.0)),
            *({"safety": 0.85, "up_margin": 0.7, "settle": 5.0, "growth": g} for g in (1.0, 2.0, 8.0))]
TARGETS_MS = (200.0, 250.0)


def heldout_traces() -> list[LinkTrace]:
    out = [LinkTrace.from_rows(make_traces.cellular_fades(seed=s), name=f"cellular-fades seed {s}") for s in range(10, 16)]
    out += [LinkTrace.from_rows(make_traces.wifi_walk(seed=s), name=f"wifi-walk seed {s}") for s in range(10, 13)]
    out += [LinkTrace.from_rows([(0, 20.0, 20.0), (t, r, 20.0)], name=f"20 -> {r:g} Mbit/s at {t} s")
            for t, r in ((15, 1.0), (25, 1.5), (40, 0.8))]
    out += [LinkTrace.from_rows([(0, r, d)], name=f"steady {r:g} Mbit/s {d:g} ms")
            for r, d in ((10.0, 20.0), (1.0, 20.0), (2.0, 40.0), (0.7, 30.0), (1.3, 25.0))]
    return out


RESIDUAL_FIELDS = ("t", "residual", "server", "compute", "gap")


def record_residuals(inference: Path, folder: Path) -> None:
    """Save the latest bench run's cellular-fades residuals as folder/RUN-DATE.csv (once per run)."""
    bench = json.loads((inference / "adaptive_infer.json").read_text())
    run = next(t for t in bench["traces"] if t["trace"] == "cellular-fades")
    path = folder / f"{bench['date'].replace(' ', 'T').replace(':', '')}.csv"
    if path.exists():
        return
    log = json.loads((inference / run["log"]).read_text())
    real = measured(LinkTrace.load("cellular-fades"), log["rows"], [Option(**o) for o in log["options"]],
                    run["trace_start_unix"])
    folder.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(RESIDUAL_FIELDS)
        writer.writerows([[f"{getattr(m, k):.6f}" for k in RESIDUAL_FIELDS] for m in real])


def load_residuals(path: Path) -> list[Measured]:
    with open(path, newline="") as fh:
        return [Measured(**{k: float(v) for k, v in row.items()}) for row in csv.DictReader(fh)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench_results/adaptive/controller_heldout.json"))
    parser.add_argument("--residuals", default=str(ROOT / "bench_results/adaptive/residuals"),
                        help="folder of recorded runs' residuals (one CSV per run)")
    args = parser.parse_args()
    if not Path(args.out).parent.is_dir():
        sys.exit(f"error: --out {args.out}: no folder {Path(args.out).parent}")
    inference, folder = ROOT / "bench_results/adaptive/inference", Path(args.residuals)
    try:
        bench = json.loads((inference / "adaptive_infer.json").read_text())
        run = next(t for t in bench["traces"] if t["trace"] == "cellular-fades")
        measured_at = {(o["budget"], o["dtype"]): o["accuracy"] for o in bench["option_accuracy"]}
        record_residuals(inference, folder)
    except (OSError, StopIteration, KeyError):
        sys.exit(f"error: no cellular-fades run with its option accuracies under {inference}: run "
                 "`splitprune bench adaptive` first")
    log = json.loads((inference / run["log"]).read_text())
    options = [Option(**o) for o in log["options"]]
    accuracy = [measured_at[o.budget, o.dtype] for o in options]
    runs = {path.stem: load_residuals(path) for path in sorted(folder.glob("*.csv"))}
    results, traces = [], heldout_traces()
    for target_ms in TARGETS_MS:
        target = target_ms / 1e3
        for settings in SETTINGS:
            rows = []
            for name, real in runs.items():
                for trace in traces:
                    requests = controller_replay(trace, options, real, target,
                                                 **{**settings, "settle": settings["settle"] or math.inf})
                    auto = score(requests, options, accuracy, target)
                    knows = oracle(trace, options, target)
                    best = score(replay(trace, options, real, knows, target), options, accuracy, target)
                    steps = reactions(trace, requests, [knows(r.index, r.t, real[r.index % len(real)]) for r in requests],
                                      target)
                    rows.append({"residuals": name, "trace": trace.name,
                                 "share_within_target": auto["share_within_target"],
                                 "vs_oracle_pt": 100 * (auto["accuracy"] - best["accuracy"]),
                                 "switches_per_100": switches_per_100([r.option for r in requests]),
                                 "requests": len(requests), "within": auto["share_within_target"] * len(requests),
                                 "reactions": steps})
            steady = [r for r in rows if r["trace"].startswith("steady")]
            summary = {k: round(f([r[key] for r in subset]), 3) for k, subset, key, f in (
                ("min_share_within", rows, "share_within_target", min),
                ("worst_vs_oracle_pt", rows, "vs_oracle_pt", min),
                ("mean_vs_oracle_pt", rows, "vs_oracle_pt", lambda v: sum(v) / len(v)),
                ("max_switches_per_100_steady", steady, "switches_per_100", max))}
            summary["pooled_share_within"] = round(sum(r["within"] for r in rows) / sum(r["requests"] for r in rows), 4)
            for direction, stats in reaction_stats([s for r in rows for s in r["reactions"]]).items():
                median = stats["median_seconds"]
                summary[f"{direction}_median_s"] = None if median is None else round(median, 3)
                summary[f"{direction}s_within_1s"] = round(stats["within_1s"] / max(stats["count"], 1), 3)
            for r in rows:   # per row only the rises' seconds: every step of every run and trace would be most of the file
                steps = r.pop("reactions")
                r["rise_s"] = [None if s["seconds"] is None else round(s["seconds"], 3) for s in steps
                               if s["direction"] == "rise"]
            results.append({"target_ms": target_ms, "settings": settings, "summary": summary, "traces": rows})
            print(target_ms, settings, summary, flush=True)
    Path(args.out).write_text(json.dumps({"command": "python scripts/controller_heldout.py",
                                          "residuals": sorted(runs), "results": results}, indent=1))


if __name__ == "__main__":
    main()
