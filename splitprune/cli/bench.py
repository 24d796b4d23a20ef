"""`splitprune bench SUITE`: benchmarks that print measurements and write JSON/CSV, plots and a markdown table."""
from __future__ import annotations

import argparse
from pathlib import Path

from splitprune.bench.core.profiles import add_profile_flags, profile_from_args
from splitprune.bench.suites import SUITE_OPTIONS, SUITES, run_suite, suite_names
from splitprune.cli.common import HelpFormatter
from splitprune.errors import UserError


def add_parser(subparsers, name: str) -> None:
    p = subparsers.add_parser(name, help="run a benchmark suite", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("suite", choices=[*SUITES, "all"], help="which suite ('all' runs every one but the stress runs "
                                                          "fuzz, soak and scale, in turn)")
    p.add_argument("--out", default="bench_results", help="results folder (one subfolder per suite)")
    p.add_argument("--clients", type=int, help="soak: concurrent training clients (default 16)")
    p.add_argument("--minutes", type=float, help="soak: how long (default 10)")
    p.add_argument("--messages", type=int, help="fuzz: structured fuzz cases (default 100000)")
    p.add_argument("--accelerator", choices=["cpu", "cuda"], help="scale: where the servers compute (default cpu)")
    p.add_argument("--part", choices=["cuts", "bring"], help="models: only the cuts of real networks, or only "
                                                          "bring-a-trained-model (default both)")
    add_profile_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    options = {k: getattr(args, k) for names in SUITE_OPTIONS.values() for k in names if getattr(args, k) is not None}
    for suite, names in SUITE_OPTIONS.items():
        given = [f"--{k}" for k in options if k in names]
        if given and args.suite != suite:
            raise UserError(f"{' and '.join(given)}: options of the {suite} suite")
    profile = profile_from_args(args)
    for suite in suite_names(args.suite):
        print(f"== bench {suite} ({args.profile}) ==")
        run_suite(suite, profile, out, **options)
    return 0
