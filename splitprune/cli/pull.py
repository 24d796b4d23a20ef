"""`splitprune pull`: fetch a remote run's server half from its server into a complete model folder.

A run trained with `--server` keeps only the device half in its folder (the server saves its half where
it runs). This is the explicit, counted transfer of the server half, as the run's checkpoint names it
(step id and digest), into a folder that `splitprune eval` and `splitprune infer` take like any other.
"""
from __future__ import annotations

import argparse

from splitprune.cli.common import HelpFormatter, add_connect_flags, connect_config


def add_parser(subparsers, name: str) -> None:
    p = subparsers.add_parser(name, help="fetch a remote run's server half into a complete model folder",
                              description=__doc__, formatter_class=HelpFormatter)
    add_connect_flags(p, "the `splitprune serve` server of the run")
    p.add_argument("--checkpoint", required=True,
                   help="the run folder (or a checkpoint folder of it, e.g. RUN/models/budget_4)")
    p.add_argument("--out", required=True, help="new folder for the complete model (must not exist or be empty)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from splitprune.client.pull import pull

    pulled = pull(args.checkpoint, connect_config(args), args.out)
    how = "on the socket" if pulled["transport"]["counted"] == "socket" else "in encoded messages"
    print(f"pulled the server half (step {pulled['step_id']}, digest {pulled['state_sha256'][:12]}) from "
          f"{pulled['from']}: {pulled['bytes_down'] / 1e6:.3f} MB down, {pulled['bytes_up'] / 1e6:.3f} MB up {how}")
    print(f"complete model: {args.out} (splitprune eval --checkpoint {args.out})")
    return 0
