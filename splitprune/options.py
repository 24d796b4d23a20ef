"""Settings declared once, with their help, type, choices and range, on a dataclass's fields: one place checks
every value (from a YAML file, a flag's text or code) and describes it (help, error messages)."""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field

from splitprune.errors import UserError


NO_LEGACY = type("NoLegacy", (), {"__repr__": lambda self: "NO_LEGACY"})()  # a field every saved config has


@dataclass(frozen=True)
class Option:
    """How one field is checked and offered as a flag."""

    help: str
    choices: tuple | None = None
    ge: float | None = None           # value >= ge
    gt: float | None = None           # value > gt
    le: float | None = None           # value <= le
    lt: float | None = None           # value < lt
    default_text: str | None = None   # what the help says the default is, when not the field's default itself
    flag: str | None = None           # the CLI flag; None: --field-name, "": no flag
    metavar: str | None = None        # the flag's value in help; None: N (integers), X (numbers), TEXT
    local: bool = False               # where/how a run executes, not what it computes: not in the fingerprint
    added: bool = False               # added after fingerprints were published: in it only when not the default
    repeat: bool = False              # a tuple of values: the flag may be given several times
    legacy: object = NO_LEGACY        # the value of configs saved before the field existed (config.stored_config)


def option(default, help: str, **spec) -> typing.Any:
    return field(default=default, metadata={"option": Option(help, **spec)})


def show(value) -> str:
    """A default or bound as help shows it: 0.0005, 15, all:22, B:22."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("{budget}", "B")


@functools.cache
def field_specs(cls: type) -> dict[str, tuple[Option, type, bool]]:
    """Field name -> (its Option, its value type, whether None is allowed), in declaration order."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kinds = typing.get_args(hint) if union else (hint,)
        kind = next(k for k in kinds if k is not type(None))
        out[f.name] = (f.metadata.get("option") or Option(f.name), typing.get_origin(kind) or kind,
                       type(None) in kinds)
    return out


def describe(cls: type, name: str) -> str:
    """What a field accepts, in words: 'an integer >= 1', 'one of sl, ca, deprune, prune', ..."""
    spec, kind, _ = field_specs(cls)[name]
    if spec.choices:
        return "one of " + ", ".join(map(str, spec.choices))
    text = {int: "an integer", float: "a number", bool: "true or false", str: "text", dict: "a mapping",
            tuple: "a list of text"}.get(kind, f"a {kind.__name__}")
    bounds = [f"{op} {show(v)}" for op, v in ((">=", spec.ge), (">", spec.gt), ("<=", spec.le), ("<", spec.lt))
              if v is not None]
    return " ".join([text, " and ".join(bounds)]).strip()


def check_value(cls: type, name: str, value):
    """`value` for field `name`, type- and range-checked (ints widen to floats); UserError otherwise."""
    spec, kind, optional = field_specs(cls)[name]
    if value is None:
        if optional:
            return None
        raise UserError(f"{name} must be {describe(cls, name)}, not empty")
    wrong = UserError(f"{name} must be {describe(cls, name)}, got {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is tuple:
        value = tuple(value) if isinstance(value, list) else value
        if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
            raise wrong
        return value
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise wrong
    if kind is float and not math.isfinite(value):
        raise wrong
    if spec.choices and value not in spec.choices:
        raise wrong
    for bound, ok in ((spec.ge, lambda b: value >= b), (spec.gt, lambda b: value > b),
                      (spec.le, lambda b: value <= b), (spec.lt, lambda b: value < b)):
        if bound is not None and not ok(bound):
            raise wrong
    return value


def parse_text(cls: type, name: str, text: str):
    """A flag's text as field `name`'s type, then checked like any other value."""
    _, kind, _ = field_specs(cls)[name]
    try:
        value = kind(text) if kind in (int, float) else text
    except ValueError:
        raise UserError(f"{name} must be {describe(cls, name)}, got {text!r}") from None
    return check_value(cls, name, value)


class Settings:
    """Base of a settings dataclass whose values are checked when it is made: `ServeConfig(max_sessions=0)`
    raises the same one-line UserError a bad flag or YAML value gets (frozen dataclasses too)."""

    def __post_init__(self) -> None:
        for name in field_specs(type(self)):
            object.__setattr__(self, name, check_value(type(self), name, getattr(self, name)))


def make_settings(cls: type, values: dict):
    """`cls(**values)` with unknown names refused in one message (values are checked by the class itself)."""
    unknown = sorted(set(values) - set(field_specs(cls)))
    if unknown:
        raise UserError(f"unknown setting(s): {', '.join(unknown)}")
    return cls(**values)
