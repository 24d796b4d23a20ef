"""`splitprune eval`: test accuracy and measured uplink bytes per sample of a checkpoint at any budget."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from splitprune.cli.common import percent
from splitprune.errors import UserError


def add_parser(subparsers, name: str) -> None:
    p = subparsers.add_parser(name, help="evaluate a checkpoint at a budget and wire dtype", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder holding checkpoint/")
    p.add_argument("--budget", help="channels kept, up to the trained budget, or 'all' (default: the trained one)")
    p.add_argument("--dtype-up", choices=["fp32", "fp16", "int8", "int4"], help="uplink dtype (default: as trained)")
    p.add_argument("--data-dir", help="where the dataset is (default: as trained)")
    p.add_argument("--test-subset", type=int, help="evaluate on N test images (default: all)")
    p.add_argument("--out", help="write the result JSON here (default: next to the checkpoint)")
    p.set_defaults(run=run)


def parse_budget(text: str | None, trained: int, channels: int) -> int:
    if text is None:
        return trained
    if text == "all":
        budget = channels
    else:
        try:
            budget = int(text)
        except ValueError:
            raise UserError(f"--budget must be an integer or 'all', got {text!r}") from None
    if budget < 1 or budget > trained:
        raise UserError(f"--budget {text}: this model was trained for budget {trained}; "
                        f"evaluate it at 1..{trained} channels")
    return budget


def run(args: argparse.Namespace) -> int:
    from splitprune.training.checkpoint import read_meta
    from splitprune.training.evaluation import evaluate_checkpoint

    meta = read_meta(args.checkpoint)
    budget = parse_budget(args.budget, int(meta["budget"]), int(meta["cut_shape"][0]))
    result = evaluate_checkpoint(meta, budget, args.dtype_up, args.data_dir, args.test_subset)
    out = Path(args.out) if args.out else Path(meta["_folder"]) / f"eval_budget{budget}_{result['dtype_up']}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"budget {budget} of {meta['cut_shape'][0]} channels, uplink {result['dtype_up']}: "
          f"test accuracy {percent(result['test_accuracy'])} on {result['test_samples']} images; "
          f"uplink {result['bytes_per_sample']:.1f} B/sample (batch {result['batch_size']}), "
          f"{result['single_sample_bytes']} B for one sample")
    print(f"written to {out}")
    return 0
