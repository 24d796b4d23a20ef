"""Command-line flags made from settings declared once: one flag per field of a settings dataclass (its
`options.Option` gives the help, the accepted values and the default the help shows); the text a flag gets
is parsed and checked by `options.parse_text`, like a value from a YAML file or from code. `to_argv` writes
settings back as flags (to start a process with them)."""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable

from splitprune.errors import UserError
from splitprune.options import check_value, describe, field_specs, parse_text, show

METAVARS = {int: "N", float: "X"}


def flag_name(cls: type, name: str) -> str:
    """The flag of field `name` ("" for a field that has none)."""
    spec = field_specs(cls)[name][0]
    return spec.flag if spec.flag is not None else "--" + name.replace("_", "-")


def _default(cls: type, name: str):
    f = cls.__dataclass_fields__[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def flag_help(cls: type, name: str, default_text: str | None = None) -> str:
    spec, kind, _ = field_specs(cls)[name]
    default = _default(cls, name)
    shown = default_text or spec.default_text or ("on" if default is True else "off" if default is False
                                                  else "none" if default in ((), None) else show(default))
    accepts = "" if kind in (str, bool, tuple) or spec.choices else f"; {describe(cls, name)}"
    return f"{spec.help}{accepts} (default: {shown})".replace("%", "%%")


def add_flags(parser: argparse.ArgumentParser, cls: type, names: Iterable[str] | None = None, *,
              default_text: dict[str, str] | None = None, title: str | None = None,
              description: str | None = None, required: Iterable[str] = (),
              help_text: dict[str, str] | None = None) -> argparse._ArgumentGroup:
    """One flag per field of `cls` (or per field in `names`); read them back with `flag_values(args, cls)`.
    `required`: names whose flag must be given; `help_text`: a command's own help for a field."""
    names = [n for n in (names or field_specs(cls)) if flag_name(cls, n)]
    group = parser.add_argument_group(title, description) if title else parser
    for name in names:
        spec, kind, _ = field_specs(cls)[name]
        text = flag_help(cls, name, (default_text or {}).get(name))
        if help_text and name in help_text:
            text = help_text[name].replace("%", "%%")
        if kind is bool:  # off by default: a switch; otherwise --x / --no-x
            action = "store_true" if _default(cls, name) is False else argparse.BooleanOptionalAction
            group.add_argument(flag_name(cls, name), dest=name, action=action, default=None, help=text)
            continue
        metavar = ("{" + ",".join(map(str, spec.choices)) + "}" if spec.choices
                   else spec.metavar or METAVARS.get(kind, "TEXT"))
        group.add_argument(flag_name(cls, name), dest=name, default=None, metavar=metavar, help=text,
                           action="append" if spec.repeat else "store", required=name in required)
    known = getattr(parser, "_settings_flags", {})
    known.setdefault(cls, []).extend(names)
    parser._settings_flags = known  # type: ignore[attr-defined]
    parser.set_defaults(**{_key(cls): tuple(known[cls])})
    return group


def _key(cls: type) -> str:
    return f"_flags_{cls.__module__}.{cls.__qualname__}"


def flag_values(args: argparse.Namespace, cls: type) -> dict:
    """The flags of `cls` given on the command line, as checked values (UserError on a bad one)."""
    values = {}
    for name in getattr(args, _key(cls), ()):
        value = getattr(args, name)
        if value is None:
            continue
        _, kind, _ = field_specs(cls)[name]
        try:
            if kind is tuple:
                values[name] = check_value(cls, name, tuple(value))
            else:
                values[name] = parse_text(cls, name, value) if isinstance(value, str) else value
        except UserError as exc:  # said with the flag the user typed
            text = str(exc)
            raise UserError(flag_name(cls, name) + text[len(name):] if text.startswith(name + " ") else text) from None
    return values


def to_argv(cls: type, values: dict) -> list[str]:
    """Flags that give `values` (fields of `cls` that have a flag and differ from their default)."""
    out = []
    for name in field_specs(cls):  # in declaration order, whatever the order of `values`
        if name not in values:
            continue
        value, flag = values[name], flag_name(cls, name)
        if not flag or value == _default(cls, name):
            continue
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            for item in value:
                out += [flag, str(item)]
        elif value is not None:
            out += [flag, str(value)]
    return out
