"""`splitprune models`: the registered models, their split points and the size of each cut tensor."""
from __future__ import annotations

import argparse

from splitprune.errors import UserError

_HEADER = ["split", "cut C x H x W", "fp32 bytes/sample", "device params", "server params", "description"]


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help="list models, split points and cut tensor sizes", description=__doc__)
    p.add_argument("--input-size", type=int, default=32, help="square input side in pixels (default 32)")
    p.add_argument("--in-channels", type=int, default=3, choices=(1, 3), help="input channels: 1 or 3 (default 3)")
    p.add_argument("--num-classes", type=int, default=10, help="classifier outputs (default 10)")
    p.add_argument("--model", default=None, help="show only this model (default: all)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from splitprune.models import list_models, list_split_points

    for key in ("input_size", "in_channels", "num_classes"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be a positive integer, got {getattr(args, key)}")
    names = list_models()
    if args.model is not None:
        list_split_points(args.model)
        names = [args.model]
    blocks = [_model_block(name, args.input_size, args.in_channels, args.num_classes) for name in names]
    print("\n\n".join(blocks))
    return 0


def _model_block(name: str, input_size: int, in_channels: int, num_classes: int) -> str:
    from splitprune.models import list_split_points

    rows = [_split_row(name, split, desc, input_size, in_channels, num_classes)
            for split, desc in list_split_points(name).items()]
    total = _param_counts(name, next(iter(list_split_points(name))), num_classes, in_channels)
    title = (f"{name}: {sum(total):,} parameters "
             f"(input {in_channels} x {input_size} x {input_size}, {num_classes} classes)")
    return "\n".join([title, *_table([_HEADER, *rows])])


def _split_row(name: str, split: str, desc: str, input_size: int, in_channels: int, num_classes: int) -> list[str]:
    from splitprune.models import cut_shape

    device_params, server_params = _param_counts(name, split, num_classes, in_channels)
    try:
        c, h, w = cut_shape(name, split, in_channels, input_size)
        shape, nbytes = f"{c} x {h} x {w}", f"{4 * c * h * w:,}"
    except UserError:
        shape, nbytes = "n/a (too small)", "-"
    return [split, shape, nbytes, f"{device_params:,}", f"{server_params:,}", desc]


def _param_counts(name: str, split: str, num_classes: int, in_channels: int) -> tuple[int, int]:
    import torch

    from splitprune.models import _split

    with torch.device("meta"):
        device, server = _split(name, split, num_classes, in_channels)
    return sum(p.numel() for p in device.parameters()), sum(p.numel() for p in server.parameters())


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  " + "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]) for row in rows]
