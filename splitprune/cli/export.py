"""`splitprune export`: the device half of a trained model as ONNX (one file per budget) + a JSON manifest,
for `splitprune-device` (ONNX Runtime, no PyTorch). Each file is checked against PyTorch on real test
images before anything is written."""
from __future__ import annotations

import argparse

from splitprune.errors import UserError


def add_parser(subparsers, name: str) -> None:
    from splitprune.manifest import TOLERANCE

    p = subparsers.add_parser(name, help="export the device half as ONNX for splitprune-device", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (or run folder) of the trained model")
    p.add_argument("--out", required=True, help="folder to write (replaced only if it holds an earlier export)")
    p.add_argument("--budget", help="budgets to export, comma-separated (e.g. 1,2,4), each up to the trained "
                                    "budget, or 'all' (every channel) (default: the trained budget)")
    p.add_argument("--dtype-up", choices=["fp32", "fp16", "int8", "int4", "ec", "ec7", "ec3"],
                   help="the device's uplink dtype (default: as trained; ec, ec7, ec3: entropy-coded on 16, 8 or 4 "
                        "levels with the model's tables)")
    p.add_argument("--data-dir", help="where the dataset is, for the check (default: as trained)")
    p.add_argument("--check-images", type=int, default=256,
                   help="test images the ONNX output is compared on (default: 256)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help=f"largest |onnx - torch| accepted on the encoder output (default: {TOLERANCE:g})")
    p.set_defaults(run=run)


def parse_budgets(text: str | None, trained: int, channels: int) -> list[int] | None:
    from splitprune.training.checkpoint import parse_budget

    if text is None:
        return None
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise UserError(f"--budget {text!r}: give budgets separated by commas, e.g. 1,2,4")
    return [parse_budget(part, trained, channels) for part in parts]


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from splitprune.manifest import check_export_folder

    check_export_folder(Path(args.out))  # before anything is loaded
    from splitprune.export import export_checkpoint
    from splitprune.training.checkpoint import read_meta

    meta = read_meta(args.checkpoint)
    budgets = parse_budgets(args.budget, int(meta.get("budget", 0)), int(meta.get("cut_shape", [0])[0]))
    m = export_checkpoint(args.checkpoint, args.out, budgets, args.data_dir, args.check_images, args.tolerance,
                          args.dtype_up)
    check = m["check"]
    for budget, entry in m["budgets"].items():
        print(f"budget {budget}: {entry['file']}  max |onnx - torch| {check['max_abs_diff'][budget]:.2g} "
              f"(tolerance {check['tolerance']:g}) on {check['images']} test images; "
              f"{check['identical_messages'][budget]}/{check['images']} uplink messages byte-identical "
              f"({m['codec']['dtype_up']})")
    print(f"model {m['fingerprint']}, server half sha256 {m['server_weights_sha256'][:16]}...: {args.out}")
    print(f"on the device: splitprune-device infer --server HOST:PORT --model {args.out} IMAGES...")
    return 0
