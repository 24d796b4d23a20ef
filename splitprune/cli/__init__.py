"""The `splitprune` command line. Each subcommand lives in its own module with `add_parser` and `run`."""
from __future__ import annotations

import argparse
import importlib
import sys

from splitprune.errors import run_command

# subcommand name -> module under splitprune.cli (each defines add_parser(subparsers) and run(args) -> int)
SUBCOMMANDS = {
    "train": "train",
    "eval": "evaluate",
    "models": "models",
    "serve": "serve",
    "infer": "infer",
    "link": "link",
    "bench": "bench",
    "pull": "pull",
    "plot": "plot",
    "export": "export",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or with `only`, just that subcommand (others' modules are not imported)."""
    parser = argparse.ArgumentParser(
        prog="splitprune",
        description="Compression-aware split learning and split inference (deprune / prune), "
                    "in-process or over gRPC, with every byte on the wire counted.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        if only is not None and name != only:
            continue
        try:
            module = importlib.import_module(f"splitprune.cli.{module_name}")
        except ModuleNotFoundError as exc:  # a subcommand not written yet
            if exc.name != f"splitprune.cli.{module_name}":
                raise
            continue
        module.add_parser(sub, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv and argv[0] in SUBCOMMANDS else None)
    return run_command("splitprune", parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
