"""Edge values of a protobuf message's fields: `mutate` changes one field of a message to a value at the
edge of its type (the structured fuzzer's cases, splitprune/bench/systems/fuzzing.py)."""
from __future__ import annotations

import random
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
Choose = Callable[[Sequence[T]], T]
U32, U64 = (1 << 32) - 1, (1 << 64) - 1
INTS = {"uint32": (0, 1, 2, 3, 255, 256, 4096, 4097, 65535, 65536, (1 << 31) - 1, 1 << 31, U32),
        "uint64": (0, 1, 2, 1 << 31, U32, 1 << 32, (1 << 63) - 1, 1 << 63, U64),
        "int32": (0, -1, 1, -(1 << 31), (1 << 31) - 1),
        "enum": (0, 1, 2, 3, 4, 5, 99, -1)}
FLOATS = (0.0, -0.0, -1.0, 1.0, 0.5, 1.5, 1e-45, 1e38, float("inf"), float("-inf"), float("nan"))
STRINGS = ("", "x", "..", "../../etc", "0" * 16, "0123456789abcdef", "f" * 64, "\u00e9\u4e2d", "{", "{}",
           "[]", '{"model": "vgg11"}', "a" * 129, "a" * 5000, "[" * 100_000, '{"a": ' * 50_000)


def bytes_variant(value: bytes, choose: Choose) -> bytes:
    cut = choose((0, 1, 2, 3))
    what = choose(("empty", "truncate", "extend", "flip", "double", "odd", "random"))
    if what == "empty":
        return b""
    if what == "truncate":
        return value[: len(value) * cut // 4]
    if what == "extend":
        return value + b"\x00" * (1 + cut * 7)
    if what == "flip" and value:
        i = len(value) * cut // 4
        return value[:i] + bytes([value[i] ^ 0xFF]) + value[i + 1:]
    if what == "double":
        return value * 2
    if what == "odd":
        return value + b"\x01"
    return bytes(random.Random(cut).randrange(256) for _ in range(1 + 13 * cut))


def _fields(msg, prefix: str = "") -> list[tuple[object, object, str]]:
    """(parent message, field descriptor, dotted path) of every field, nested messages included."""
    out = []
    for fd in msg.DESCRIPTOR.fields:
        path = prefix + fd.name
        out.append((msg, fd, path))
        if fd.message_type is not None and not fd.is_repeated and msg.HasField(fd.name):
            out.extend(_fields(getattr(msg, fd.name), path + "."))
    return out


def mutate(msg, choose: Choose) -> str:
    """Change one field of `msg` in place to an edge value of its type; a description of the change."""
    parent, fd, path = choose(_fields(msg))
    t = fd.type
    if fd.is_repeated:
        values = list(getattr(parent, fd.name))
        action = choose(("clear", "drop", "append", "edge"))
        del getattr(parent, fd.name)[:]
        if action == "drop":
            values = values[:-1]
        elif action in ("append", "edge") and fd.message_type is None:
            edge = choose(INTS["uint64" if t == fd.TYPE_UINT64 else "uint32"])
            values = values + [edge] if action == "append" or not values else [edge] + values[1:]
        if action != "clear" and fd.message_type is None:
            getattr(parent, fd.name).extend(values)
        return f"{path}: {action}"
    if fd.message_type is not None:
        parent.ClearField(fd.name)
        return f"{path}: cleared"
    if t == fd.TYPE_BOOL:
        value = not getattr(parent, fd.name)
    elif t in (fd.TYPE_FLOAT, fd.TYPE_DOUBLE):
        value = choose(FLOATS)
    elif t == fd.TYPE_STRING:
        value = choose(STRINGS + (getattr(parent, fd.name)[:-1], getattr(parent, fd.name) + "x"))
    elif t == fd.TYPE_BYTES:
        value = bytes_variant(getattr(parent, fd.name), choose)
    elif t == fd.TYPE_ENUM:
        value = choose(INTS["enum"])
    else:
        kind = {fd.TYPE_UINT64: "uint64", fd.TYPE_INT32: "int32"}.get(t, "uint32")
        value = choose(INTS[kind])
    try:
        setattr(parent, fd.name, value)
    except (ValueError, TypeError):  # not representable in this field (e.g. a negative enum): leave it out
        return f"{path}: unrepresentable {value!r}"
    return f"{path} = {value!r}"[:120]
