"""Pieces shared by subcommands: run-config flags (made from RunConfig's fields), output checks, printing."""
from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from splitprune.config import RunConfig, load_yaml, make_config
from splitprune.errors import UserError
from splitprune.options import describe, field_specs, parse_text, show


class HelpFormatter(argparse.HelpFormatter):
    """Adds '(default: X)' to options that have a default; run-config flags write their own real one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and "%(default)" not in text and "(default:" not in text \
                and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def flag_name(name: str) -> str:
    spec = field_specs(RunConfig)[name][0]
    return spec.flag if spec.flag is not None else "--" + name.replace("_", "-")


def flag_help(name: str, default_text: str | None = None) -> str:
    spec, kind, _ = field_specs(RunConfig)[name]
    default = RunConfig.__dataclass_fields__[name].default
    shown = default_text or spec.default_text or ("on" if default is True else "off" if default is False
                                                  else show(default))
    accepts = "" if kind in (str, bool) or spec.choices else f"; {describe(RunConfig, name)}"
    return f"{spec.help}{accepts} (default: {shown})".replace("%", "%%")


# Flags that take a value, flag -> (field, type, help); bench.runs writes `splitprune train` commands from it.
CONFIG_FLAGS = {flag_name(name): (name, kind, spec.help)
                for name, (spec, kind, _) in field_specs(RunConfig).items() if flag_name(name) and kind in (int, float, str)}


METAVARS = {int: "N", float: "X"}


def add_config_flags(parser: argparse.ArgumentParser, names: Iterable[str] | None = None,
                     default_text: dict[str, str] | None = None, yaml_file: bool = True,
                     title: str = "run configuration") -> None:
    """One flag per RunConfig field (or per field in `names`); their text is checked by config.parse_text."""
    names = [n for n in (names or field_specs(RunConfig)) if flag_name(n)]
    group = parser.add_argument_group(title, "any of these can also be set in a --config YAML file"
                                      if yaml_file else None)
    for name in names:
        spec, kind, _ = field_specs(RunConfig)[name]
        text = flag_help(name, (default_text or {}).get(name))
        if kind is bool:
            group.add_argument(flag_name(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                               help=text)
        else:
            metavar = "{" + ",".join(map(str, spec.choices)) + "}" if spec.choices else spec.metavar or METAVARS.get(kind, "TEXT")
            group.add_argument(flag_name(name), dest=name, default=None, metavar=metavar, help=text)
    if yaml_file:
        group.add_argument("--config", metavar="FILE.yaml", help="YAML file of options (flags given here win)")
    parser.set_defaults(config_options=tuple(names))


def flag_values(args: argparse.Namespace) -> dict:
    """The run-config flags given on the command line, as checked values."""
    values = {}
    for name in args.config_options:
        value = getattr(args, name)
        if value is not None:
            values[name] = parse_text(RunConfig, name, value) if isinstance(value, str) else value
    return values


def config_from_args(args: argparse.Namespace) -> RunConfig:
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    values.update(flag_values(args))
    return make_config(values)


# ---------------------------------------------------------------------------------------------- output
def check_out_folder(path: str | Path, flag: str = "--out") -> Path:
    """Refuse a folder that cannot be created or written, before any work; leaves nothing behind."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {path} exists and is not a folder")
    created = []
    try:
        for missing in reversed([p for p in (folder, *folder.parents) if not p.exists()]):
            missing.mkdir()
            created.append(missing)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise UserError(f"{flag} {path} cannot be written: {exc.strerror or exc}") from None
    finally:
        for made in reversed(created):
            made.rmdir()
    return folder


def check_out_file(path: str | Path, flag: str = "--out") -> Path:
    file = Path(path)
    if file.is_dir():
        raise UserError(f"{flag} {path} is a folder: give a file name")
    check_out_folder(file.parent, flag)
    return file


def write_text_atomic(path: Path, text: str) -> None:
    """Write a whole file or nothing: readers never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------- printing
def percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
