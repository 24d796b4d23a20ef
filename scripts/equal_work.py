"""The other equal-work comparison: dedicated ca models at two server steps per batch, as the any-budget model takes.

    python scripts/equal_work.py [--budgets 4,8,16] [--also anybudget_repro] [--out bench_results/adaptive/equal_work]

Reads bench_results/adaptive/runs/ca{B}_2step[_seed1] (`splitprune train --method ca --server-steps 2`, the
quick profile's ca command otherwise; their command.txt), scores each final model on the full 10k test set at
its budget (cached in the run's full_test_budgets.json), and sets them against the any-budget model (two server
steps) and the one-step dedicated models as `splitprune bench adaptive` recorded them (adaptive/adaptive.json).
`--also`: more any-budget runs of the same recipe (NAME and NAME_seed1 under the same folder, scored the same way),
pooled with the recorded ones; the table then also gives the mean difference with one standard error (the two
groups' sample variances), the verdict by that interval.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from cut_table import accuracy  # noqa: E402

from splitprune.bench.core.common import markdown_table  # noqa: E402
from splitprune.bench.core.verdict import Interval, difference, explain, interval  # noqa: E402

RUNS = ROOT / "bench_results/adaptive/runs"


def mean_difference(a: list[float], b: list[float]) -> Interval:
    """mean(a) - mean(b) +- one standard error (each group's sample variance over its size)."""
    se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
    d = statistics.fmean(a) - statistics.fmean(b)
    return Interval(d - se, d + se)


def budgets_arg(text: str) -> list[int]:
    try:
        budgets = [int(x) for x in text.split(",")]
    except ValueError:
        budgets = []
    if not budgets or min(budgets) < 1:
        raise argparse.ArgumentTypeError(f"--budgets takes budgets >= 1 separated by commas, not {text!r}")
    return budgets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=budgets_arg, default="4,8,16")
    parser.add_argument("--also", default="anybudget_repro", help="more any-budget runs (names, comma-separated)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results/adaptive/equal_work")
    args = parser.parse_args()
    extra = [p for name in args.also.split(",") if name for p in (RUNS / name, RUNS / f"{name}_seed1")]
    if missing := [str(p) for p in extra if not (p / "summary.json").exists()]:
        sys.exit(f"error: --also: no finished run at {', '.join(missing)}")
    recorded = json.loads((ROOT / "bench_results/adaptive/adaptive.json").read_text())["accuracy"]["verdicts"]
    rows, doc = [], {}
    if missing := [b for b in args.budgets if str(b) not in recorded]:
        sys.exit(f"error: --budgets: no recorded any-budget accuracy at B = {', '.join(map(str, missing))}")
    for b in args.budgets:
        runs = [p for p in (RUNS / f"ca{b}_2step", RUNS / f"ca{b}_2step_seed1") if (p / "summary.json").exists()]
        two = [accuracy(p, (b,))[str(b)] for p in runs]
        ours = recorded[str(b)]["anybudget"] + [accuracy(p, (b,))[str(b)] for p in extra]
        one = recorded[str(b)]["rival_accuracy"]
        gap = difference(interval(ours), interval(two)) if two else None
        mean = mean_difference(ours, two) if len(two) > 1 else None
        doc[b] = {"anybudget_2steps": ours, "ca_1step": one, "ca_2steps": two, "difference": gap.__dict__ if gap else None,
                  "mean_difference": mean.__dict__ if mean else None}
        rows.append([b, ", ".join(f"{100 * a:.2f}%" for a in ours), ", ".join(f"{100 * a:.2f}%" for a in one),
                     ", ".join(f"{100 * a:.2f}%" for a in two) or "not run", gap.text() if gap else "n/a",
                     explain(gap, -0.003, "anybudget - ca (2 steps)") if gap else "not measured",
                     explain(mean, -0.003, "mean difference") if mean else "not measured"])
    table = markdown_table(["budget", "anybudget, 2 server steps (runs)", "ca, 1 step (seeds)", "ca, 2 steps (seeds)",
                            "anybudget - ca (2 steps)", "verdict (0.3 pt, worst pairing)",
                            "verdict (0.3 pt, mean difference +- 1 SE)"], rows)
    command = "python scripts/equal_work.py " + " ".join(sys.argv[1:])
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "budgets": doc}, indent=1))
    args.out.with_suffix(".md").write_text(f"`{command.strip()}` (full 10k test set)\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
