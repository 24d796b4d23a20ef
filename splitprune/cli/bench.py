"""`splitprune bench SUITE`: benchmarks that print measurements and write JSON/CSV, plots and a markdown table."""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from splitprune.errors import UserError

if TYPE_CHECKING:
    from splitprune.bench.runs import Profile

# suite -> module under splitprune.bench with run(profile: str | Profile, out) -> dict; `all` runs them in this order:
SUITES = {
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
    add_profile_flags(p)
    p.set_defaults(run=run)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_profile_flags(parser: argparse.ArgumentParser) -> None:
    """Settings on top of --profile (flags of `python -m splitprune.bench.runs` too), read by `profile_from_args`."""
    g = parser.add_argument_group("profile settings (without them: the profile's own)")
    g.add_argument("--smoke", action="store_true",
                   help="tiny sizes on the CPU (vgg11_bn_compact, a few dozen images, 2 epochs): tests and dry runs")
    g.add_argument("--train-subset", type=_positive_int, metavar="N",
                   help="training images (a stratified subset; the rate suite's prune chain gets N/2, at least 16, "
                        "per phase) instead of the profile's (quick 2500, paper 4000)")
    g.add_argument("--epochs", type=_positive_int, metavar="E",
                   help="epochs of the from-scratch runs (sl, ca, deprune) instead of the profile's (quick 4, paper "
                        "22); prune gets E*20/22, at least 2")
    g.add_argument("--threads", type=_positive_int, metavar="T",
                   help="torch CPU threads of each run instead of the profile's 2")
    g.add_argument("--data-dir", metavar="DIR",
                   help="where the Fashion-MNIST IDX files are; without it, the dataset's standard place")
    g.add_argument("--no-train", action="store_true",
                   help="never train: report the runs that are there, stopped ones from their last checkpoint and "
                        "ones made with other settings with a warning (reports after a time-boxed run)")
    g.add_argument("--use-partial", action="store_true",
                   help="a run that starts from another run's checkpoint takes it even if that run did not finish, "
                        "instead of finishing it first")


def profile_from_args(args: argparse.Namespace) -> Profile:
    """The Profile of --profile with the settings of `add_profile_flags` on top."""
    from splitprune.bench.runs import get_profile

    return get_profile(args.profile, smoke=args.smoke, train_subset=args.train_subset, epochs=args.epochs,
                       threads=args.threads, data_dir=args.data_dir, no_train=args.no_train,
                       use_partial=args.use_partial)


def run_suite(suite: str, profile: str | Profile, out: Path, **options) -> dict:
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
    profile = profile_from_args(args)
    for suite in suites:
        print(f"== bench {suite} ({args.profile}) ==")
        run_suite(suite, profile, out, **options)
    return 0
