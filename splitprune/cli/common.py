"""Pieces shared by subcommands: run-config flags (made from RunConfig's fields), output checks, printing."""
from __future__ import annotations

import argparse
import os
from collections.abc import Iterable

from splitprune.client.config import ConnectConfig
from splitprune.config import RunConfig, load_yaml, make_config
from splitprune.errors import UserError
from splitprune.flags import add_flags, flag_values
from splitprune.wire.addresses import TOKEN_ENV


class HelpFormatter(argparse.HelpFormatter):
    """Adds '(default: X)' to options that have a default; run-config flags write their own real one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and "%(default)" not in text and "(default:" not in text \
                and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def add_config_flags(parser: argparse.ArgumentParser, names: Iterable[str] | None = None,
                     default_text: dict[str, str] | None = None, yaml_file: bool = True,
                     title: str = "run configuration") -> None:
    """One flag per RunConfig field (or per field in `names`), and --config FILE.yaml."""
    group = add_flags(parser, RunConfig, names, default_text=default_text, title=title,
                      description="any of these can also be set in a --config YAML file" if yaml_file else None)
    if yaml_file:
        group.add_argument("--config", metavar="FILE.yaml", help="YAML file of options (flags given here win)")


def add_connect_flags(parser: argparse.ArgumentParser, server_help: str | None = None) -> None:
    """--server and how to reach it (ConnectConfig); `server_help` given: --server is required (pull, infer)."""
    add_flags(parser, ConnectConfig, required=("server",) if server_help else (),
              help_text={"server": server_help} if server_help else None, title="the server")


def connect_config(args: argparse.Namespace) -> ConnectConfig:
    """The ConnectConfig of the flags given; the token from $SPLITPRUNE_TOKEN when --token is not."""
    values = flag_values(args, ConnectConfig)
    if "token" not in values and os.environ.get(TOKEN_ENV):
        values["token"] = os.environ[TOKEN_ENV]
    return ConnectConfig(**values)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    values.update(flag_values(args, RunConfig))
    cfg = make_config(values)
    if cfg.weights:
        from splitprune.models import file_digest

        digest = file_digest(cfg.weights)
        if cfg.weights_sha256 and cfg.weights_sha256 != digest:
            raise UserError(f"--weights {cfg.weights} is not the file the config names (weights_sha256 "
                            f"{cfg.weights_sha256[:16]}...)")
        cfg.weights_sha256 = digest
    return cfg


def idle_cores(load: float | None = None, cores: int | None = None) -> int:
    """CPU cores the other processes leave free (the 1-minute load average off the core count), at least 1: a
    thread setting that does not collapse when another job runs (two processes that each use every core slow
    each other down about tenfold on 2 cores)."""
    import os

    cores = cores or os.cpu_count() or 1
    load = os.getloadavg()[0] if load is None else load
    return max(1, min(cores, int(cores - load + 0.5)))


# ---------------------------------------------------------------------------------------------- printing
def percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
