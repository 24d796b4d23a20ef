"""Compare the controller's rate estimators on held-out link traces: synthetic ones and real cellular uplinks.

    python scripts/estimator_heldout.py [--targets 200,500] [--out bench_results/adaptive/estimators.json]

Replays `--budget auto`'s controller (splitprune.adaptive.replay, the stream's warm-up first) with each rate
estimator (splitprune/adaptive/estimators.py: "pairs" as before, "harmonic" after RobustMPC, "sized" after Fugu)
over the held-out traces of scripts/controller_heldout.py and the "select" segments of the real Mahimahi uplink
traces (bench_results/traces/mahimahi, scripts/convert_mahimahi.py), with the recorded runs' residual latencies and
the quick-profile model's option accuracies (bench_results/adaptive). Settings are chosen here; the "test"
segments are replayed too, reported separately, never chosen on. Per estimator, target and trace group: the
share of requests in time (worst trace, pooled), accuracy against the oracle, bytes per request as a share of the
oracle's, what an oracle that knows the link as it was 0.25 s and 1 s ago keeps in time (how far the past
predicts the trace: a bound on any estimator), and the reactions to rate steps of 2x or more (rows of one second: a real trace's steps that held for
at least 2 s, as well as every one).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from controller_heldout import heldout_traces, load_residuals  # noqa: E402

from splitprune.adaptive.controller import Option  # noqa: E402
from splitprune.adaptive.estimators import ESTIMATORS  # noqa: E402
from splitprune.adaptive.replay import (controller_replay, fixed, measured, network_seconds,  # noqa: E402
                                        oracle, reaction_stats, reactions, replay, score)
from splitprune.link.trace import LinkTrace, builtin_traces  # noqa: E402

REAL = ROOT / "bench_results/traces/mahimahi"
LAGS = (0.25, 1.0)   # the late oracles: the link exactly as it was this many seconds ago
DEFAULT_INFERENCE = ROOT / "bench_results/adaptive/inference"
VARIANTS = {name: {"estimator": name} for name in ESTIMATORS}
VARIANTS.update({
    "sized-wide": {"estimator": "sized", "up_margin": 0.8, "safety": 0.9},
    "pairs-wide": {"estimator": "pairs", "up_margin": 0.8, "safety": 0.9},
    "sized-fast": {"estimator": "sized", "hold": 0.5, "growth": 16.0},
    "pairs-fast": {"estimator": "pairs", "hold": 0.5, "growth": 16.0},
})


def full_ladder(logged: list[Option]) -> list[Option]:
    """Every power-of-two budget of the logged dtypes, bytes from a line through the logged options' sizes."""
    out = []
    for dtype in dict.fromkeys(o.dtype for o in logged):
        (b1, u1, d1), (b2, u2, d2) = [(o.budget, o.bytes_up, o.bytes_down) for o in logged if o.dtype == dtype][::-1][:2]
        for budget in (2 ** k for k in range(10)):
            up = round(u2 + (u1 - u2) * (budget - b2) / (b1 - b2))
            out.append(Option(budget, dtype, up, d1))
    return sorted(out, key=lambda o: (o.bytes, o.budget))


def lagged(trace: LinkTrace, options: list[Option], target: float, lag: float):
    """The oracle one `lag` late: it knows the link exactly as it was `lag` seconds ago (and each request's own
    residual). What no estimate of the past can beat: how predictable the trace is from its own past."""
    def choose(i: int, t: float, m) -> int:
        fits = [k for k, o in enumerate(options)
                if m.residual + network_seconds(trace, max(t - lag, 0.0), o, m.server) <= target]
        return max(fits) if fits else 0
    return choose


def groups() -> dict[str, list[LinkTrace]]:
    real = sorted(REAL.glob("*.csv"))
    return {"shipped": [LinkTrace.load(name) for name in builtin_traces()],
            "synthetic held-out": heldout_traces(),
            "real select": [LinkTrace.load(p) for p in real if p.name.startswith("select-")],
            "real test": [LinkTrace.load(p) for p in real if p.name.startswith("test-")]}


def run_group(traces, runs, options, accuracy, target, settings: dict) -> dict:
    rows, steps, held = [], [], []
    for name, real in runs.items():
        for trace in traces:
            requests = controller_replay(trace, options, real, target, **settings)
            auto = score(requests, options, accuracy, target)
            knows = oracle(trace, options, target)
            best = score(replay(trace, options, real, knows, target), options, accuracy, target)
            oracle_choice = [knows(r.index, r.t, real[r.index % len(real)]) for r in requests]
            fixed_scores = [score(replay(trace, options, real, fixed(k), target), options, accuracy, target)
                            for k in range(len(options))]
            as_often = [f["accuracy"] for f in fixed_scores if f["share_within_target"] >= auto["share_within_target"]]
            late = {lag: score(replay(trace, options, real, lagged(trace, options, target, lag), target), options,
                               accuracy, target) for lag in LAGS}
            steps += reactions(trace, requests, oracle_choice, target)
            held += reactions(trace, requests, oracle_choice, target, hold=2.0)
            rows.append({"residuals": name, "trace": trace.name, "share": auto["share_within_target"],
                         "requests": auto["requests"], "vs_oracle_pt": 100 * (auto["accuracy"] - best["accuracy"]),
                         "bytes_vs_oracle": (auto["bytes_up"] / auto["requests"]) /
                                            max(best["bytes_up"] / best["requests"], 1e-9),
                         "vs_best_fixed_pt": 100 * (auto["accuracy"] - max(as_often)) if as_often else None,
                         **{f"lagged_{lag:g}s_share": h["share_within_target"] for lag, h in late.items()},
                         **{f"lagged_{lag:g}s_bytes_vs_oracle": (h["bytes_up"] / h["requests"]) /
                            max(best["bytes_up"] / best["requests"], 1e-9) for lag, h in late.items()}})
    pooled = sum(r["share"] * r["requests"] for r in rows) / sum(r["requests"] for r in rows)
    beats = [r["vs_best_fixed_pt"] for r in rows if r["vs_best_fixed_pt"] is not None]
    return {"min_share": min(r["share"] for r in rows), "pooled_share": pooled,
            "min_vs_best_fixed_pt": min(beats) if beats else None,
            **{f"lagged_{lag:g}s_min_share": min(r[f"lagged_{lag:g}s_share"] for r in rows) for lag in LAGS},
            **{f"lagged_{lag:g}s_mean_bytes_vs_oracle": sum(r[f"lagged_{lag:g}s_bytes_vs_oracle"] for r in rows)
               / len(rows) for lag in LAGS},
            "mean_vs_oracle_pt": sum(r["vs_oracle_pt"] for r in rows) / len(rows),
            "worst_vs_oracle_pt": min(r["vs_oracle_pt"] for r in rows),
            "min_bytes_vs_oracle": min(r["bytes_vs_oracle"] for r in rows),
            "mean_bytes_vs_oracle": sum(r["bytes_vs_oracle"] for r in rows) / len(rows),
            "reactions": reaction_stats(steps), "reactions_held_2s": reaction_stats(held), "traces": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="200,500", help="latency targets, ms")
    parser.add_argument("--variants", default=",".join(ESTIMATORS),
                        help="comma-separated names of VARIANTS (an estimator and the controller settings with it)")
    parser.add_argument("--inference", type=Path, default=DEFAULT_INFERENCE,
                        help="a bench's adaptive inference results: the model's options, accuracies and residuals")
    parser.add_argument("--groups", default="synthetic held-out,real select,real test",
                        help="of: shipped (the built-in traces: the benchmark's), synthetic held-out, real select, "
                             "real test")
    parser.add_argument("--ladder", choices=("log", "full"), default="log",
                        help="log: the options of the recorded run (its validation ranking dropped B=4, 16, 64 and "
                             "256); full: every power-of-two budget, as the ranking with RANK_TOLERANCE keeps them")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results/adaptive/estimators.json")
    parser.add_argument("--render", type=Path, help="only write the markdown of this results file next to it")
    args = parser.parse_args()
    if args.render:
        if not args.render.is_file():
            sys.exit(f"error: --render {args.render}: no such results file")
        args.render.with_suffix(".md").write_text(render(json.loads(args.render.read_text())))
        return
    targets, variants, wanted = checked(args)
    inference = args.inference
    bench = json.loads((inference / "adaptive_infer.json").read_text())
    run = next(t for t in bench["traces"] if t["trace"] == "cellular-fades")
    measured_at = {(o["budget"], o["dtype"]): o["accuracy"] for o in bench["option_accuracy"]}
    options = [Option(**o) for o in json.loads((inference / run["log"]).read_text())["options"]]
    logged = options
    if args.ladder == "full":
        options = full_ladder(logged)
    accuracy = [measured_at[o.budget, o.dtype] for o in options]
    if args.inference == DEFAULT_INFERENCE:   # every recorded run of this model, pooled (controller_heldout.py)
        runs = {p.stem: load_residuals(p) for p in sorted((ROOT / "bench_results/adaptive/residuals").glob("*.csv"))}
    else:   # another model: the residuals of its own cellular-fades run
        log = json.loads((inference / run["log"]).read_text())
        runs = {"own cellular-fades run": measured(LinkTrace.load("cellular-fades"), log["rows"], logged,
                                                   run["trace_start_unix"])}
    results, loaded = [], {group: traces for group, traces in groups().items() if group in wanted}
    for target_ms in targets:
        for estimator in variants:
            for group, traces in loaded.items():
                r = run_group(traces, runs, options, accuracy, target_ms / 1e3, VARIANTS[estimator])
                results.append({"target_ms": target_ms, "variant": estimator, "settings": VARIANTS[estimator],
                                "group": group, **r})
                print(f"{target_ms:g} ms {estimator:9s} {group:18s} in time min {100 * r['min_share']:.1f}% pooled "
                      f"{100 * r['pooled_share']:.2f}%  vs oracle {r['mean_vs_oracle_pt']:+.2f} pt (worst "
                      f"{r['worst_vs_oracle_pt']:+.2f})  bytes/oracle min {r['min_bytes_vs_oracle']:.2f} mean "
                      f"{r['mean_bytes_vs_oracle']:.2f} (late oracles: " + ", ".join(
                          f"{lag:g} s: in time min {100 * r[f'lagged_{lag:g}s_min_share']:.1f}%" for lag in LAGS) +
                      f")  rises<=1s {r['reactions']['rise']['within_1s']}/"
                      f"{r['reactions']['rise']['count']} (held 2s: {r['reactions_held_2s']['rise']['within_1s']}/"
                      f"{r['reactions_held_2s']['rise']['count']})  falls<=1s {r['reactions']['fall']['within_1s']}/"
                      f"{r['reactions']['fall']['count']}", flush=True)
    doc = {"command": "python scripts/estimator_heldout.py " + " ".join(sys.argv[1:]), "residuals": sorted(runs),
           "results": results}
    args.out.write_text(json.dumps(doc, indent=1))
    args.out.with_suffix(".md").write_text(render(doc))


def checked(args) -> tuple[list[float], list[str], list[str]]:
    """--targets, --variants and --groups as lists, or one clear message and exit 2 before anything is read."""
    try:
        targets = [float(t) for t in args.targets.split(",")]
    except ValueError:
        targets = []
    if not targets or not all(0 < t < 60_000 for t in targets):
        sys.exit(f"error: --targets takes latency targets in ms between 0 and 60000, comma-separated, "
                 f"got {args.targets!r}")
    variants = [v.strip() for v in args.variants.split(",")]
    if not all(v in VARIANTS for v in variants):
        sys.exit(f"error: --variants: choose from {', '.join(VARIANTS)}, got {args.variants!r}")
    wanted = [g.strip() for g in args.groups.split(",")]
    known = ("shipped", "synthetic held-out", "real select", "real test")
    if not all(g in known for g in wanted):
        sys.exit(f"error: --groups: choose from {', '.join(known)}, got {args.groups!r}")
    if not (args.inference / "adaptive_infer.json").is_file():
        sys.exit(f"error: --inference {args.inference}: no adaptive_infer.json (a `splitprune bench adaptive` "
                 f"inference run) there")
    return targets, variants, wanted


def render(doc: dict) -> str:
    """The results as markdown tables, one per target (`--render JSON` writes them again from a results file)."""
    from splitprune.bench.core.common import markdown_table

    lines = [f"`{doc['command']}` (residuals of {len(doc['residuals'])} recorded run(s))", ""]
    for target in dict.fromkeys(r["target_ms"] for r in doc["results"]):
        rows = []
        for r in (r for r in doc["results"] if r["target_ms"] == target):
            rise, fall = r["reactions"]["rise"], r["reactions"]["fall"]
            held = r["reactions_held_2s"]["rise"]
            rows.append([r["variant"], r["group"], f"{100 * r['min_share']:.1f} / {100 * r['pooled_share']:.2f}",
                         f"{r['mean_vs_oracle_pt']:+.2f} ({r['worst_vs_oracle_pt']:+.2f})",
                         f"{r['mean_bytes_vs_oracle']:.2f} ({r['min_bytes_vs_oracle']:.2f})",
                         f"{rise['within_1s']}/{rise['count']} ({held['within_1s']}/{held['count']})",
                         f"{fall['within_1s']}/{fall['count']}",
                         "-" if r.get("min_vs_best_fixed_pt") is None else f"{r['min_vs_best_fixed_pt']:+.2f}",
                         " / ".join(f"{100 * r[f'lagged_{lag:g}s_min_share']:.1f}" for lag in LAGS
                                    if f"lagged_{lag:g}s_min_share" in r) or "-"])
        lines += [f"Target {target:g} ms:", "", markdown_table(
            ["variant", "traces", "% in time (worst trace / pooled)", "pt vs oracle (worst)",
             "bytes / oracle's (worst)", "rises answered <= 1 s (held 2 s)", "falls <= 1 s",
             "pt above the best fixed option in time as often (worst)",
             "late oracle 0.25 s / 1 s: % in time (worst)"], rows).rstrip(), ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
