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
    "adaptive": "adaptive",       # any-budget model, --budget auto over traces (inference and training)
    "link": "link_time",
    "device": "device",
    "step": "step",               # the timing suites last (transport measures rate's chosen configurations)
    "transport": "transport",
    "fuzz": "fuzz",
    "soak": "soak",
    "scale": "scale",             # server samples/s and latency vs concurrent clients, with and without batching
    "all": None,
}
STRESS = ("fuzz", "soak", "scale")  # long server stress runs: not part of 'all'
SUITE_OPTIONS = {"soak": ("clients", "minutes"), "fuzz": ("messages",), "scale": ("accelerator",)}


def add_parser(subparsers, name: str) -> None:
    p = subparsers.add_parser(name, help="run a benchmark suite", description=__doc__)
    p.add_argument("suite", choices=list(SUITES), help="which suite ('all' runs every one in turn)")
    p.add_argument("--profile", choices=["quick", "paper"], default="quick",
                   help="quick: CPU, Fashion-MNIST subset, vgg11_bn_compact; paper: the paper's model (GPU)")
    p.add_argument("--out", default="bench_results", help="results folder (one subfolder per suite)")
    p.add_argument("--clients", type=int, help="soak: concurrent training clients (default 16)")
    p.add_argument("--minutes", type=float, help="soak: how long (default 10)")
    p.add_argument("--messages", type=int, help="fuzz: structured fuzz cases (default 100000)")
    p.add_argument("--accelerator", choices=["cpu", "cuda"], help="scale: where the servers compute (default cpu)")
    p.set_defaults(run=run)


def run_suite(suite: str, profile: str, out: Path, **options) -> dict:
    try:
        module = importlib.import_module(f"splitprune.bench.{SUITES[suite]}")
    except ModuleNotFoundError as exc:
        raise UserError(f"benchmark suite {suite!r} is not available: {exc}") from None
    return module.run(profile, out / suite, **options)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    suites = [s for s in SUITES if s != "all" and s not in STRESS] if args.suite == "all" else [args.suite]
    options = {k: getattr(args, k) for names in SUITE_OPTIONS.values() for k in names if getattr(args, k) is not None}
    for suite, names in SUITE_OPTIONS.items():
        given = [f"--{k}" for k in options if k in names]
        if given and args.suite != suite:
            raise UserError(f"{' and '.join(given)}: options of the {suite} suite")
    for suite in suites:
        print(f"== bench {suite} ({args.profile}) ==")
        run_suite(suite, args.profile, out, **options)
    return 0
