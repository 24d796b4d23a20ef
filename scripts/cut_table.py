"""The any-budget model against dedicated models at another cut: accuracy per budget on the full test set.

    python scripts/cut_table.py --runs bench_results/adaptive_pool1/runs --out bench_results/adaptive_pool1/accuracy

Reads RUNS/anybudget[_seed1] (any-budget, evaluated at every budget of the ladder) and RUNS/ca{B}[_seed1], RUNS/sl
[_seed1] (dedicated: each at its own budget); every final model on the full 10k test set through the real codec
(cached per run in full_test_budgets.json). Per budget: the difference over every pairing of the seeds present,
the verdict against issue 26's target (within 0.3 pt) by the project's rule, and the dedicated recipe against
itself where it has two seeds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from splitprune.bench.adaptive.accuracy import LADDER, label, one_run  # noqa: E402
from splitprune.bench.core.common import markdown_table  # noqa: E402
from splitprune.bench.core.verdict import difference, explain, interval  # noqa: E402

NEED = -0.003
CACHE = "full_test_budgets.json"


def accuracy(run: Path, budgets: tuple) -> dict[str, float]:
    cache = run / CACHE
    done = json.loads(cache.read_text()) if cache.exists() else {}
    todo = tuple(b for b in budgets if label(b) not in done)
    if todo:
        done.update({k: v["accuracy"] for k, v in one_run(run / "checkpoint", todo, "test").items()})
        cache.write_text(json.dumps(done, indent=1))
    return done


def seeds(runs: Path, name: str) -> list[Path]:
    return [p for p in (runs / name, runs / f"{name}_seed1") if (p / "summary.json").exists()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    if not seeds(args.runs, "anybudget"):
        sys.exit(f"error: --runs {args.runs}: no finished any-budget run (anybudget/summary.json) there")
    ours = [accuracy(p, LADDER) for p in seeds(args.runs, "anybudget")]
    rows, doc = [], {}
    for b in LADDER:
        rival = "sl" if b is None else f"ca{b}"
        theirs = [accuracy(p, (b,))[label(b)] for p in seeds(args.runs, rival)]   # each at its own budget
        mine = [r[label(b)] for r in ours]
        gap = difference(interval(mine), interval(theirs)) if mine and theirs else None
        itself = difference(interval(theirs), interval(theirs)) if len(theirs) > 1 else None
        doc[label(b)] = {"anybudget": mine, "rival": rival, "rival_accuracy": theirs,
                         "difference": gap.__dict__ if gap else None, "verdict": explain(gap, NEED, "anybudget - " + rival)}
        rows.append([label(b), ", ".join(f"{100 * a:.2f}%" for a in mine),
                     f"{rival}: " + (", ".join(f"{100 * a:.2f}%" for a in theirs) or "not run"),
                     gap.text() if gap else "n/a", doc[label(b)]["verdict"] if theirs else "not measured",
                     itself.text() if itself else "n/a (one seed)"])
    table = markdown_table(["budget", "anybudget (seeds)", "dedicated (seeds)", "difference", "verdict (0.3 pt)",
                            "dedicated vs itself"], rows)
    command = f"python scripts/cut_table.py --runs {args.runs} --out {args.out}"
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "budgets": doc}, indent=1))
    args.out.with_suffix(".md").write_text(f"`{command}` (full 10k test set)\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
