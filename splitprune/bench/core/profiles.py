"""Benchmark profiles: a table of named profiles, and the settings a user may put on top of one.

`quick` (CPU, vgg11_bn_compact, a Fashion-MNIST subset, schedules of the paper's shape scaled to a few
epochs), `paper-cpu` (the paper's schedules to the end on this machine's CPU: the same model on 2,500 images)
and `paper` (vgg11_bn and the paper's schedules, for a GPU). The settings a user may change are the
Profile fields declared with `option(...)`; `splitprune bench` and `python -m splitprune.bench` make their
flags from them (splitprune.flags), and `get_profile` takes them as arguments.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace

from splitprune.config import CALIBRATION
from splitprune.errors import UserError
from splitprune.flags import add_flags, flag_values
from splitprune.options import check_value, option

PAPER_EPOCHS = 22  # sl / ca / deprune epochs in the paper (Fig. 6)


@dataclass(frozen=True)
class Profile:
    name: str
    model: str
    curve_subset: int | None      # test images of the per-epoch evaluation (curves); None = all 10k
    full_subset: int | None       # test images of the headline evaluations; None = all 10k
    full_last: int                # last epochs of a headline run also evaluated on the full test set (1: the final model)
    prune_epochs: int             # prune 32:x,4:x from the sl model; paper: 20
    chain_subset: int | None      # training images per phase of the rate suite's prune chain (1 epoch each)
    finetune_epochs: int          # rate baselines fine-tuned from the sl model (about the chain's samples to B=2)
    accelerator: str
    test_batch_size: int
    topk: tuple[int, ...]         # top-k baseline: values kept per sample
    link_steps: int               # time-to-accuracy suite: training steps measured through the link
    # the settings a user may change (flags of `splitprune bench`)
    train_subset: int | None = option(None, "training images (a stratified subset; the rate suite's prune chain "
                                      "gets N/2, at least 16, per phase)", ge=1, le=10_000_000, metavar="N",
                                      default_text="the profile's: quick 2500, paper 4000")
    epochs: int = option(PAPER_EPOCHS, "epochs of the from-scratch runs (sl, ca, deprune); prune gets E*20/22, at "
                         "least 2", ge=1, le=10_000, metavar="E", default_text="the profile's: quick 4, paper 22")
    threads: int | None = option(2, "torch CPU threads of each run", ge=1, le=1024, metavar="T",
                                 default_text="the profile's, 2")
    smoke: bool = option(False, "tiny sizes on the CPU (vgg11_bn_compact, a few dozen images, 2 epochs): tests and "
                         "dry runs")
    data_dir: str | None = option(None, "where the Fashion-MNIST IDX files are", metavar="DIR",
                                  default_text="the dataset's standard place")
    no_train: bool = option(False, "never train: report the runs that are there, stopped ones from their last "
                            "checkpoint and ones made with other settings with a warning (reports after a "
                            "time-boxed run)")
    use_partial: bool = option(False, "a run that starts from another run's checkpoint takes it even if that run "
                               "did not finish, instead of finishing it first")
    lr_schedule: str = "constant"  # the paper's constant lr, or "cosine" per phase (quick: short runs settle)
    chain_dtypes: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")  # dtypes the rate suite evaluates chain models at
    validation: int = 2000         # training images held out for choosing configurations (never trained on)
    bn_calibration: int = CALIBRATION  # training images that recompute BatchNorm statistics before each evaluation
    seeds: tuple[int, ...] = field(default=(0, 1))  # every headline run at each seed

    def settings(self) -> dict:
        return dict(self.__dict__)


# the names `get_profile` takes, in the order their flags are listed
SETTINGS = ("smoke", "train_subset", "epochs", "threads", "data_dir", "no_train", "use_partial")

PROFILES: dict[str, Profile] = {
    "quick": Profile("quick", "vgg11_bn_compact", curve_subset=1000, full_subset=None, full_last=1, prune_epochs=2,
                     chain_subset=1000, finetune_epochs=2, accelerator="cpu", test_batch_size=256, topk=(8, 32, 512),
                     link_steps=30, train_subset=2500, epochs=4, threads=2, lr_schedule="cosine",
                     chain_dtypes=("int8", "int4")),
    # the paper's schedules exactly (22 epochs: sl all:22, ca 4:22, deprune 4:15,all:7, prune 32:10,4:10; constant lr,
    # batch 16, the paper's momentum) on this machine's CPU: the quick profile's model on 2,500 images, one thread
    "paper-cpu": Profile("paper-cpu", "vgg11_bn_compact", curve_subset=1000, full_subset=None, full_last=1,
                         prune_epochs=20, chain_subset=1000, finetune_epochs=2, accelerator="cpu", test_batch_size=256,
                         topk=(8, 32, 512), link_steps=30, train_subset=2500, epochs=PAPER_EPOCHS, threads=1,
                         chain_dtypes=("int8", "int4"), bn_calibration=0),
    "paper": Profile("paper", "vgg11_bn", curve_subset=2000, full_subset=None, full_last=1, prune_epochs=20,
                     chain_subset=2000, finetune_epochs=3, accelerator="cuda", test_batch_size=500,
                     topk=(4, 8, 32, 128, 512), link_steps=30, train_subset=4000, epochs=PAPER_EPOCHS, threads=2,
                     bn_calibration=0),
}


def get_profile(name: str, *, smoke: bool = False, train_subset: int | None = None, epochs: int | None = None,
                threads: int | None = None, data_dir: str | None = None, no_train: bool = False,
                use_partial: bool = False) -> Profile:
    """The named profile with these settings on top (None / False: the profile's own)."""
    if name not in PROFILES:
        raise UserError(f"unknown profile {name!r}: {' or '.join(PROFILES)}")
    for setting, value in (("train_subset", train_subset), ("epochs", epochs), ("threads", threads)):
        if value is not None:
            check_value(Profile, setting, value)
    p = PROFILES[name]
    if p.accelerator == "cuda":
        import torch

        p = replace(p, accelerator="cuda" if torch.cuda.is_available() else "cpu")
    if smoke:
        p = replace(p, model="vgg11_bn_compact", train_subset=48, curve_subset=32, full_subset=64,
                    full_last=1, epochs=2, prune_epochs=2, chain_subset=16, finetune_epochs=1, threads=1,
                    accelerator="cpu", test_batch_size=32, topk=(4, 32), link_steps=3, smoke=True, validation=48,
                    chain_dtypes=("int8", "int4"))
    if train_subset is not None:
        p = replace(p, train_subset=train_subset, chain_subset=max(train_subset // 2, 16))
    if epochs is not None:
        p = replace(p, epochs=epochs, prune_epochs=max(2, round(epochs * 20 / PAPER_EPOCHS)))
    if threads is not None:
        p = replace(p, threads=threads)
    return replace(p, data_dir=data_dir or None, no_train=no_train, use_partial=use_partial)


def profile_name(profile: str | Profile) -> str:
    """The name of a suite's `profile` argument (a name or a Profile): for suites that only look at the name."""
    return profile.name if isinstance(profile, Profile) else profile


def add_profile_flags(parser: argparse.ArgumentParser) -> None:
    """--profile and the settings on top of it (the Profile fields a user may change)."""
    parser.add_argument("--profile", choices=list(PROFILES), default="quick",
                        help="quick: CPU, Fashion-MNIST subset, vgg11_bn_compact, schedules scaled to 4 epochs; "
                             "paper-cpu: the paper's schedules to the end on the CPU (2,500 images); paper: the "
                             "paper's model (GPU)")
    add_flags(parser, Profile, SETTINGS, title="profile settings (without them: the profile's own)")


def profile_from_args(args: argparse.Namespace) -> Profile:
    return get_profile(args.profile, **flag_values(args, Profile))
