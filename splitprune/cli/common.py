"""Pieces shared by subcommands: run-config flags, config merging, result printing."""
from __future__ import annotations

import argparse

from splitprune.config import METHODS, RunConfig, load_yaml, make_config

# flag -> (RunConfig field, type, help). Defaults come from RunConfig (the paper's values).
CONFIG_FLAGS = {
    "--model": ("model", str, "backbone (see `splitprune models`)"),
    "--split": ("split", str, "split point name, e.g. conv5 (the paper's) or pool2"),
    "--dataset": ("dataset", str, "fashion-mnist, mnist, cifar10, cifar100 or folder"),
    "--data-dir": ("data_dir", str, "where the dataset's files are (default: the dataset's standard place)"),
    "--budget": ("budget", int, "ca's fixed channel budget B"),
    "--schedule": ("schedule", str, "phases BUDGET:EPOCHS,... e.g. 4:15,all:7"),
    "--epochs": ("epochs", int, "sl/ca: epochs; deprune/prune: total, the default schedule scaled to it"),
    "--dtype-up": ("dtype_up", str, "activation dtype on the uplink: fp32, fp16, int8 or int4"),
    "--dtype-down": ("dtype_down", str, "gradient dtype on the downlink: fp32, fp16, int8 or int4"),
    "--resolution": ("resolution", int, "resolution compression factor r (1, 2, ...)"),
    "--scaling": ("scaling", str, "kept-channel scaling: paper (x mask) or binary"),
    "--batch-size": ("batch_size", int, "training batch size"),
    "--test-batch-size": ("test_batch_size", int, "evaluation batch size"),
    "--lr": ("lr", float, "learning rate (default: the method's paper value)"),
    "--momentum": ("momentum", float, "SGD momentum (default: the method's paper value)"),
    "--lr-schedule": ("lr_schedule", str, "constant (the paper's) or cosine: each phase decays its lr to ~0"),
    "--weight-decay": ("weight_decay", float, "SGD weight decay"),
    "--input-size": ("input_size", int, "model input size in pixels"),
    "--in-channels": ("in_channels", int, "model input channels, 1 or 3 (default: the dataset's)"),
    "--seed": ("seed", int, "random seed"),
    "--train-subset": ("train_subset", int, "use N training images (seeded, stratified)"),
    "--test-subset": ("test_subset", int, "use N test images"),
    "--from": ("from_checkpoint", str, "start from this checkpoint (prune)"),
    "--threads": ("threads", int, "torch CPU threads"),
    "--accelerator": ("accelerator", str, "cpu or cuda: where both halves compute in-process"),
}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=METHODS, default=None, help="sl, ca, deprune or prune")
    for flag, (dest, kind, text) in CONFIG_FLAGS.items():
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=text)
    parser.add_argument("--augment", dest="augment", action=argparse.BooleanOptionalAction, default=None,
                        help="CIFAR-style augmentation (default: the dataset's)")
    parser.add_argument("--tensorboard", action="store_true", default=None, help="also log to OUT/tensorboard")
    parser.add_argument("--config", help="YAML file of options (flags given here win)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    values = load_yaml(args.config) if args.config else {}
    names = ["method", "augment", "tensorboard"] + [dest for dest, _, _ in CONFIG_FLAGS.values()]
    values.update({name: getattr(args, name) for name in names if getattr(args, name) is not None})
    return make_config(values)


def percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
