"""`splitprune models`: where a model can be cut, and what each cut costs.

Without --model: the built-in backbones and their named cuts. With --model SOURCE (a built-in name,
torchvision:NAME, timm:NAME or py:package.module:factory): every valid cut of that model, found from its graph
(a point where exactly one tensor crosses from the device part to the server part), with the cut tensor, its
fp32 bytes per sample, and the device part's parameters and multiply-accumulates.
"""
from __future__ import annotations

import argparse

from splitprune.errors import UserError

_HEADER = ["split", "cut tensor", "fp32 bytes/sample", "device params", "device MACs", "server params", "note"]


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help="list models, their valid cuts and what each costs", description=__doc__)
    p.add_argument("--model", default=None, metavar="SOURCE",
                   help="list every valid cut of this model (default: the built-in backbones' named cuts)")
    p.add_argument("--input-size", type=int, default=None, metavar="N",
                   help="square input side in pixels (default 32; 224 for torchvision and timm models)")
    p.add_argument("--in-channels", type=int, default=None, choices=(1, 3),
                   help="input channels (default: the model's; 3 for built-in backbones)")
    p.add_argument("--num-classes", type=int, default=10, help="classifier outputs (default 10)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    for key in ("input_size", "num_classes"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise UserError(f"--{key.replace('_', '-')} must be a positive integer, got {value}")
    from splitprune.config import from_source_text

    if args.model is not None:
        from_source_text(args.model)
    from splitprune.models import list_models, model_in_channels

    if args.model is None:
        blocks = [_block(name, args.input_size or 32, args.in_channels or 3, args.num_classes, named_only=True)
                  for name in list_models()]
        blocks.append("every valid cut of a model: splitprune models --model SOURCE (a built-in name, "
                      "torchvision:NAME, timm:NAME or py:package.module:factory)")
    else:
        builtin = args.model in list_models()
        size = args.input_size or (32 if builtin else 224)
        channels = args.in_channels or model_in_channels(args.model) or 3
        blocks = [_block(args.model, size, channels, args.num_classes, named_only=False)]
    print("\n\n".join(blocks))
    return 0


def _block(model: str, input_size: int, in_channels: int, num_classes: int, named_only: bool) -> str:
    from splitprune.models import list_cuts

    cuts = list_cuts(model, num_classes, in_channels, input_size)
    if named_only:
        cuts = [c for c in cuts if c.description]
    rows = [_row(c) for c in cuts]
    total = (cuts[0].device_params + cuts[0].server_params) if cuts else 0
    title = (f"{model}: {total:,} parameters (input {in_channels} x {input_size} x {input_size}, "
             f"{num_classes} classes), {len(rows)} {'named' if named_only else 'valid'} cuts")
    return "\n".join([title, *_table([_HEADER, *rows])])


def _row(c) -> list[str]:
    name = c.name if c.name == c.layer else f"{c.name} ({c.layer})"
    if c.shape is None:
        return [name, "n/a (too small)", "-", f"{c.device_params:,}", "-", f"{c.server_params:,}", c.description]
    note = c.description or ("" if c.feature_map else "not a feature map: no bottleneck here")
    return [name, " x ".join(map(str, c.shape)), f"{c.fp32_bytes:,}", f"{c.device_params:,}",
            _si(c.device_macs), f"{c.server_params:,}", note]


def _si(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  " + "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]).rstrip() for row in rows]
