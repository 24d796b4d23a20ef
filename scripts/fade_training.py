"""Training through fades at several seeds: `--budget auto` against every fixed budget (issue 26's last target).

    python scripts/fade_training.py [--seeds 0,1] [--out bench_results/adaptive/fade_training]

Each seed is `splitprune bench adaptive`'s training part (splitprune.bench.adaptive.training: a real server, the
looped cellular-fades link in front of it, anybudget from scratch through it at auto and at fixed budgets) in
OUT/seed{N}; a finished run is reused. Run it with nothing else on the machine: the speed target is in seconds.

Targets: auto no slower to the common accuracy than the fastest fixed budget (per seed: the lowest best accuracy of
that seed's runs), and within noise of the most accurate fixed budget (by mean final accuracy over the seeds) at
the end: the difference over every pairing of seeds, each accuracy's binomial standard error on the test images
counted against auto.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from splitprune.bench.adaptive.training import Settings, measure  # noqa: E402
from splitprune.bench.core.common import markdown_table  # noqa: E402
from splitprune.bench.core.verdict import at_most, difference, explain, interval  # noqa: E402


def seeds_arg(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"--seeds takes seeds >= 0 separated by commas, not {text!r}")
    return seeds


def summarize(results: dict[int, dict], images: int) -> dict:
    budgets = [r["budget"] for r in next(iter(results.values()))["rows"]]
    final = {b: [next(r for r in res["rows"] if r["budget"] == b)["final_accuracy"] for res in results.values()]
             for b in budgets}
    fixed = [b for b in budgets if b != "auto"]
    best = max(fixed, key=lambda b: sum(final[b]) / len(final[b]))
    se = max((p * (1 - p) / images) ** 0.5 for b in ("auto", best) for p in final[b])
    gap = difference(interval(final["auto"], se), interval(final[best], se))
    def fastest(res: dict) -> float:   # the seed's fastest fixed budget, as measure() picked it
        return next(r["time_to_common_s"] for r in res["rows"] if r["budget"] == res["fastest_fixed"])

    lag = [res["auto"]["time_to_common_s"] - fastest(res) if res["auto"]["time_to_common_s"] is not None else None
           for res in results.values()]
    speed = at_most(interval(lag), 0.0)
    return {"final_accuracy": final, "most_accurate_fixed": best,
            "accuracy_verdict": explain(gap, 0.0, f"auto - fixed {best}"),
            "auto_minus_fastest_fixed_s": lag, "speed_verdict": speed}


def markdown(results: dict[int, dict], summary: dict, command: str) -> str:
    lines = [f"`{command}`", ""]
    for seed, res in results.items():
        rows = [[r["budget"], f"{100 * r['final_accuracy']:.2f}",
                 "-" if r["time_to_common_s"] is None else f"{r['time_to_common_s']:.0f}",
                 f"{r['train_seconds']:.0f}", f"{(r['bytes_up'] + r['bytes_down']) / 1e6:.1f}"] for r in res["rows"]]
        lines += [f"seed {seed} (common accuracy {100 * res['common_accuracy']:.1f} %):", "",
                  markdown_table(["budget", "final accuracy %", "s to common", "training s", "MB up+down"],
                                 rows).rstrip(), ""]
    lag = ", ".join("-" if x is None else f"{x:+.0f} s" for x in summary["auto_minus_fastest_fixed_s"])
    lines += [f"auto no slower to the common accuracy than the fastest fixed budget (auto - fastest per seed: {lag}): "
              f"{summary['speed_verdict']}; within noise of the most accurate fixed budget at the end: "
              f"{summary['accuracy_verdict']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=seeds_arg, default=[0, 1])
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results/adaptive/fade_training")
    args = parser.parse_args()
    command = "python scripts/fade_training.py " + shlex.join(sys.argv[1:])
    results = {seed: measure(args.out / f"seed{seed}", Settings(seed=seed)) for seed in args.seeds}
    summary = summarize(results, Settings().test_subset)
    doc = {"command": command.strip(), "seeds": args.seeds, "summary": summary,
           "per_seed": {str(s): {k: v for k, v in r.items() if k != "curves"} for s, r in results.items()}}
    (args.out / "fade_training.json").write_text(json.dumps(doc, indent=1))
    (args.out / "fade_training.md").write_text(markdown(results, summary, command.strip()))
    print(markdown(results, summary, command.strip()))


if __name__ == "__main__":
    main()
