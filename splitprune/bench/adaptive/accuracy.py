"""One any-budget model against a dedicated model per budget: accuracy at B = 1, 2, 4, ..., 64 and all channels.

The any-budget run's final model (bench run `anybudget`, each seed) is evaluated at every budget of the ladder on
the full test set, through the real codec (prefix messages); its rivals are the dedicated runs' final models on the
same test set: ca{B} (suite adaptive; ca4 lives in suite deprune) and sl for all channels, each at its seeds.
Target per budget: the any-budget model is within 0.5 pt of its rival, the difference taken over every pairing
of seeds (splitprune.bench.core.verdict): holds if even the worse seed holds, fails if even the better one fails.

Runs are only read, never trained: whatever is missing is named in the verdict ("not measured: ..."). The
evaluations of a model are cached next to it (budget_accuracy.json), keyed by the checkpoint's seal.

    python -m splitprune.bench.adaptive.accuracy --out bench_results [--rivals DIR] [--threads 1]

prints the table; `splitprune bench adaptive` is what records it (adaptive/adaptive.json).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from splitprune.bench.core.common import markdown_table
from splitprune.bench.core.plan import RunSpec, plan, run_dir, seed_names
from splitprune.bench.core.profiles import Profile, get_profile
from splitprune.bench.core.report import load_profile
from splitprune.bench.core.runs import full_test_loader, headline_accuracy, load_record
from splitprune.bench.core.verdict import (FAILS, HOLDS, NOT_MEASURED, NOT_RESOLVED, difference, explain, interval,
                                           verdict)
from splitprune.errors import UserError

LADDER: tuple[int | None, ...] = (1, 2, 4, 8, 16, 32, 64, None)  # None: all channels
RIVALS = {b: "sl" if b is None else f"ca{b}" for b in LADDER}
NEED = -0.005  # at most 0.5 pt below the dedicated model
CACHE = "budget_accuracy.json"


def label(budget: int | None) -> str:
    return "all" if budget is None else str(budget)


@torch.no_grad()
def accuracy_at_budgets(checkpoint: str | Path, budgets: tuple[int | None, ...], loader) -> dict[str, dict]:
    """The model of `checkpoint` at each budget (None: all) on `loader`: accuracy and uplink bytes per sample.

    The device half runs once per batch (training.trainer.evaluate_budgets); each budget's request goes
    through the server half as its serialized message."""
    from splitprune.export import load_workers
    from splitprune.training.evaluation import evaluate_budgets
    from splitprune.training.server_worker import LocalLink

    device, server, *_ = load_workers(str(checkpoint))
    start = time.perf_counter()
    results = evaluate_budgets(device, LocalLink(server), loader, list(budgets))
    seconds = time.perf_counter() - start
    return {label(b): {"accuracy": r.accuracy, "samples": r.samples,
                       "bytes_per_sample": r.bytes_up / max(r.samples, 1), "seconds": round(seconds, 1)}
            for b, r in results.items()}


def anybudget_accuracy(spec: RunSpec, root: Path, profile, budgets=LADDER) -> dict[str, dict] | None:
    """The finished run's final model at `budgets` on the profile's full test set (cached); None if unfinished."""
    from splitprune.config import stored_config
    from splitprune.training.checkpoint import read_meta

    folder = run_dir(root, spec)
    if not (folder / "summary.json").exists():
        return None
    meta = read_meta(folder / "checkpoint")
    key = f"{meta.get('seal')}:{profile.full_subset}"
    cache_path = folder / CACHE
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    done = cache.get(key, {})
    todo = tuple(b for b in budgets if label(b) not in done)
    if todo:
        loader = full_test_loader(stored_config(meta["config"]), profile)
        done.update(accuracy_at_budgets(folder / "checkpoint", todo, loader))
        cache_path.write_text(json.dumps({key: done}, indent=2))
    return done


def rival_accuracy(base: str, root: Path, profile) -> tuple[list[float | None], list[str]]:
    """Final-model full-test accuracy of run BASE at each seed, and what is missing."""
    specs = plan(profile)
    values, missing = [], []
    for name in seed_names(base, profile):
        record = load_record(specs[name], root)
        if record is None or not record["complete"] or not record["full_test"]:
            missing.append(f"{name} ({'not started' if record is None else 'not finished'} under "
                           f"{run_dir(root, specs[name])})")
            values.append(None)
        else:
            values.append(headline_accuracy(record)[0])
    return values, missing


def compare(root: Path, rivals_root: Path | None = None, profile: str | Profile = "quick",
            threads: int | None = None, base: str = "anybudget") -> dict:
    """The table and verdicts of the any-budget target; `rivals_root`: where the ca/sl runs are (default root)."""
    if threads:
        torch.set_num_threads(threads)
    profile = load_profile(profile)
    specs = plan(profile)
    rivals_root = rivals_root or root
    ours, ours_missing = [], []
    for name in seed_names(base, profile):
        result = anybudget_accuracy(specs[name], root, profile)
        ours.append(result)
        if result is None:
            folder = run_dir(root, specs[name])
            ours_missing.append(f"{name} ({'not finished' if folder.exists() else 'not started'} under {folder})")
    rows, verdicts = [], {}
    for b in LADDER:
        values = [None if r is None else r[label(b)]["accuracy"] for r in ours]
        theirs, missing = rival_accuracy(RIVALS[b], rivals_root, profile)
        gap = difference(interval(values), interval(theirs))
        missing = ours_missing + missing
        text = f"{NOT_MEASURED}: missing {', '.join(missing)}" if missing else explain(gap, NEED, f"anybudget - {RIVALS[b]}")
        verdicts[label(b)] = {"verdict": verdict(gap, NEED) if not missing else NOT_MEASURED, "text": text,
                              "anybudget": values, "rival": RIVALS[b], "rival_accuracy": theirs,
                              "difference": gap.__dict__ if gap else None, "missing": missing}
        itself = difference(interval(theirs), interval(theirs))
        verdicts[label(b)]["rival_against_itself"] = itself.__dict__ if itself else None
        rows.append([label(b), _seeds(values), f"{RIVALS[b]}: {_seeds(theirs)}", gap.text() if gap else "n/a", text,
                     f"{100 * itself.low:+.2f} pt" if itself else "n/a"])
    states = {v["verdict"] for v in verdicts.values()}
    overall = (FAILS if FAILS in states else HOLDS if states == {HOLDS} else
               NOT_MEASURED if NOT_MEASURED in states else NOT_RESOLVED)
    # the last column: the dedicated recipe against itself (its seeds' worst pairing): the noise floor of the rule
    table = markdown_table(["budget", f"{base} (seeds)", "dedicated model (seeds)", "difference", "verdict",
                            "dedicated vs itself (worst pairing)"], rows)
    return {"table": table, "verdicts": verdicts, "overall": overall, "need": NEED,
            "anybudget": {name: r for name, r in zip(seed_names(base, profile), ours)}}


def one_run(run: str | Path, budgets: tuple[int | None, ...], split: str = "validation") -> dict[str, dict]:
    """Any run's final model at `budgets` on its validation images (held out by its validation_size) or the
    full test set: for choosing between configurations on validation data."""
    from splitprune.config import stored_config
    from splitprune.data import validation_loader
    from splitprune.training.checkpoint import read_meta

    meta = read_meta(run)
    cfg = stored_config(meta["config"])
    if split == "validation":
        loader = validation_loader(cfg.dataset, cfg.data_dir, cfg.input_size, meta["in_channels"],
                                   cfg.validation_size, 256)
    else:
        loader = full_test_loader(cfg, get_profile("quick"))
    return accuracy_at_budgets(meta["_folder"], budgets, loader)


def _budgets(text: str) -> tuple[int | None, ...]:
    try:
        return tuple(None if t == "all" else int(t) for t in text.split(","))
    except ValueError:
        raise UserError(f"--budgets must be integers or 'all', comma-separated, got {text!r}") from None


def _seeds(values: list[float | None]) -> str:
    return ", ".join("n/a" if v is None else f"{100 * v:.2f}%" for v in values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitprune.bench.adaptive.accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_results", help="results root holding adaptive/runs/anybudget*")
    parser.add_argument("--rivals", help="results root holding the ca and sl runs (default: --out)")
    parser.add_argument("--profile", choices=["quick", "paper"], default="quick")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--base", default="anybudget", help="the any-budget run of the plan (default: anybudget)")
    parser.add_argument("--run", help="instead: evaluate this one run's final model at --budgets on --split")
    parser.add_argument("--budgets", default="1,4,all", help="with --run: budgets, e.g. 1,4,all (default)")
    parser.add_argument("--split", choices=["validation", "test"], default="validation", help="with --run")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run:
        try:
            found = one_run(args.run, _budgets(args.budgets), args.split)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(json.dumps({"run": args.run, "split": args.split, "accuracy": found}, indent=2))
        return 0
    try:
        result = compare(Path(args.out), Path(args.rivals) if args.rivals else None, args.profile, args.threads,
                         args.base)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result["table"])
    print(f"overall: {result['overall']} (every budget within {-100 * NEED:.1f} pt of its dedicated model)")
    print("(printed only: `splitprune bench adaptive` records the results, in adaptive/adaptive.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
