"""`splitprune bench SUITE`: benchmarks that print measurements and write JSON/CSV, plots and a markdown table."""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from splitprune.errors import UserError

SUITES = {  # suite -> module under splitprune.bench with run(profile, out) -> dict; `all` runs them in this order:
    "deprune": "deprune",         # training suites first,
    "prune": "prune",
    "resolution": "resolution",
    "rate": "rate",
    "link": "link_time",          # the timing suites last (transport measures rate's chosen configurations)
    "step": "step",
    "transport": "transport",
    "all": None,
}


def add_parser(subparsers, name: str) -> None:
    p = subparsers.add_parser(name, help="run a benchmark suite", description=__doc__)
    p.add_argument("suite", choices=list(SUITES), help="which suite ('all' runs every one in turn)")
    p.add_argument("--profile", choices=["quick", "paper"], default="quick",
                   help="quick: CPU, Fashion-MNIST subset, vgg11_bn_compact; paper: the paper's model (GPU)")
    p.add_argument("--out", default="bench_results", help="results folder (one subfolder per suite)")
    p.set_defaults(run=run)


def run_suite(suite: str, profile: str, out: Path) -> dict:
    try:
        module = importlib.import_module(f"splitprune.bench.{SUITES[suite]}")
    except ModuleNotFoundError as exc:
        raise UserError(f"benchmark suite {suite!r} is not available: {exc}") from None
    return module.run(profile, out / suite)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    suites = [s for s in SUITES if s not in ("all",)] if args.suite == "all" else [args.suite]
    for suite in suites:
        print(f"== bench {suite} ({args.profile}) ==")
        run_suite(suite, args.profile, out)
    return 0
