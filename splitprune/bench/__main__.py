"""`python -m splitprune.bench`: train named runs of a profile's plan (for parallel processes on one machine),
print the plan (`--list`, each run with its `splitprune train` command), or run suites' reports (`--suite`,
each failure reported while the others still run).

    python -m splitprune.bench --profile paper --out DIR NAME...
    python -m splitprune.bench --profile quick --list
    python -m splitprune.bench --no-train --suite deprune prune
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from splitprune.bench.core.plan import cli_command, plan
from splitprune.bench.core.profiles import add_profile_flags, profile_from_args
from splitprune.bench.core.runs import ensure
from splitprune.bench.suites import SUITES, run_suite
from splitprune.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m splitprune.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="runs to train (default: all, in plan order)")
    parser.add_argument("--out", default="bench_results", help="results root (suites' folders inside)")
    parser.add_argument("--list", action="store_true", help="print the plan and each run's command")
    parser.add_argument("--suite", nargs="+", metavar="SUITE", choices=list(SUITES),
                        help="run these suites' reports instead of training runs")
    add_profile_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        profile = profile_from_args(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    specs, root = plan(profile), Path(args.out)
    if args.suite:
        failed = []
        for suite in args.suite:
            print(f"== suite {suite} ({args.profile}) ==", flush=True)
            try:
                run_suite(suite, profile, root)
            except Exception:  # noqa: BLE001 - one suite's failure must not lose the others' results
                traceback.print_exc()
                failed.append(suite)
        if failed:
            print(f"failed suites: {failed}", file=sys.stderr)
        return 1 if failed else 0
    names = args.names or list(specs)
    unknown = [n for n in names if n not in specs]
    if unknown:
        print(f"unknown run(s) {unknown}; the plan has {list(specs)}", file=sys.stderr)
        return 2
    if args.list:
        for name in names:
            print(f"{name:14s} [{specs[name].suite}] {specs[name].label}\n    {cli_command(specs[name], root, specs)}")
        return 0
    try:
        for name in names:
            ensure(name, profile, root)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
