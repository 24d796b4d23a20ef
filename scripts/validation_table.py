"""Validation accuracy per budget of any-budget runs, side by side (how a variant is chosen: never on the test set).

    python scripts/validation_table.py --runs anybudget_1step,anybudget_rung_1step,anybudget,anybudget_rung \
        [--root bench_results/adaptive/runs] [--out bench_results/adaptive/rung_decoder]

Reads each run and its _seed1 twin (the `budget_validation` its trainer measured on the run's held-out training
images, in the checkpoint's meta), and writes OUT.json and OUT.md: one row per run and seed, the mean over
B = 1..64, and each variant's gain over the first run of its pair (runs are paired in order: 1st with 2nd, 3rd
with 4th, ...).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from splitprune.bench.core.common import markdown_table  # noqa: E402
from splitprune.errors import UserError  # noqa: E402

MIDDLE = ("1", "2", "4", "8", "16", "32", "64")


def validation(run: Path) -> dict[str, float]:
    meta = run / "checkpoint" / "meta.json"
    if not meta.exists():
        raise UserError(f"{run} has no checkpoint (train it first; checkpoints are not in git)")
    found = json.loads(meta.read_text()).get("budget_validation")
    if not found:
        raise UserError(f"{run} measured no per-budget validation accuracy (trained without --validation-size?)")
    return found["accuracy"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="run names, paired in order (baseline, variant, ...)")
    parser.add_argument("--root", type=Path, default=ROOT / "bench_results/adaptive/runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results/adaptive/rung_decoder")
    args = parser.parse_args()
    names = [n for n in args.runs.split(",") if n]
    if not names or len(names) % 2:
        raise UserError("--runs takes pairs of run names (baseline,variant[,baseline,variant...])")
    table = {}
    for name in names:
        for seed, run in ((0, args.root / name), (1, args.root / f"{name}_seed1")):
            table[f"{name}, seed {seed}"] = validation(run)
    budgets = list(next(iter(table.values())))
    rows = [[label, *(f"{100 * acc[b]:.2f}" for b in budgets), f"{100 * sum(acc[b] for b in MIDDLE) / 7:.2f}"]
            for label, acc in table.items()]
    gains = {}
    for base, variant in zip(names[::2], names[1::2]):
        for seed in (0, 1):
            a, b = table[f"{base}, seed {seed}"], table[f"{variant}, seed {seed}"]
            gains[f"{variant} - {base}, seed {seed}"] = {
                "mean_1_64_pt": 100 * sum(b[k] - a[k] for k in MIDDLE) / 7,
                "per_budget_pt": {k: 100 * (b[k] - a[k]) for k in budgets}}
    command = "python scripts/validation_table.py " + shlex.join(sys.argv[1:])
    lines = [f"`{command}`", "", "Accuracy % on each run's 2,000 held-out training images (validation), per budget:",
             "", markdown_table(["run", *budgets, "mean 1-64"], rows).rstrip(), "",
             *(f"- {k}: {v['mean_1_64_pt']:+.2f} pt on average over B = 1..64" for k, v in gains.items())]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "validation": table, "gains": gains},
                                                        indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        sys.exit(f"validation_table: error: {exc}")
