"""`splitprune eval`: test accuracy and measured uplink bytes per sample of a checkpoint at any budget."""
from __future__ import annotations

import argparse
import json

from splitprune.cli.common import HelpFormatter, add_config_flags, percent
from splitprune.config import RunConfig
from splitprune.files import check_out_file, write_text_atomic
from splitprune.flags import flag_values

# run-config fields eval can change from the checkpoint's own (everything else is as trained)
OVERRIDES = ("dtype_up", "data_dir", "test_subset", "test_batch_size", "threads")
AS_TRAINED = {"dtype_up": "as trained", "data_dir": "as trained", "test_batch_size": "as trained",
              "test_subset": "as the run was evaluated while training; a number at least the test set's size: all"}


def add_parser(subparsers, name: str) -> None:
    p = subparsers.add_parser(name, help="evaluate a checkpoint at a budget and wire dtype", description=__doc__,
                              formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder holding checkpoint/")
    p.add_argument("--budget", dest="at_budget", metavar="BUDGET",
                   help="channels kept, up to the trained budget, or 'all' (default: the trained one)")
    p.add_argument("--out", help="also write the result as JSON to this file (default: print only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(p, OVERRIDES, AS_TRAINED, yaml_file=False, title="changes to the trained configuration")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    overrides = flag_values(args, RunConfig)  # bad flags are refused before torch is imported
    from splitprune.training.checkpoint import parse_budget, read_meta
    from splitprune.training.evaluation import evaluate_checkpoint

    out = check_out_file(args.out) if args.out else None
    meta = read_meta(args.checkpoint)
    budget = parse_budget(args.at_budget, int(meta["budget"]), int(meta["cut_shape"][0]))
    overrides.setdefault("test_subset", meta["config"].get("test_subset"))  # the images it was evaluated on
    result = evaluate_checkpoint(meta, budget, progress=not args.quiet, **overrides)
    if out is not None:
        write_text_atomic(out, json.dumps(result, indent=2))
    print(f"budget {budget} of {meta['cut_shape'][0]} channels, uplink {result['dtype_up']}: "
          f"test accuracy {percent(result['test_accuracy'])} on {result['test_samples']} images; "
          f"uplink {result['bytes_per_sample']:.1f} B/sample (batch {result['batch_size']}), "
          f"{result['single_sample_bytes']} B for one sample")
    if out is not None:
        print(f"written to {out}")
    return 0
