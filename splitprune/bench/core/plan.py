"""The plan of training runs behind the benchmark suites: one plan per profile, shared between suites.

Every run has its own folder ROOT/SUITE/runs/NAME, where SUITE is the suite that owns it (e.g. the sl run
lives under deprune/ and is the baseline of prune and rate too). Headline runs are trained at each of the
profile's seeds (NAME, NAME_seed1); verdicts take the worse of the seeds (splitprune.bench.core.verdict).
Every run holds out `validation` training images (the same ones for every seed) for choosing
configurations. `cli_command` is the `splitprune train` command that trains a run by itself.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from splitprune.bench.core.profiles import Profile
from splitprune.bench.paper.baselines import Baseline
from splitprune.compression.bottleneck import FixedRandomChannels, NarrowBottleneck
from splitprune.config import RunConfig, make_config
from splitprune.flags import flag_name
from splitprune.options import field_specs


@dataclass(frozen=True)
class RunSpec:
    name: str
    suite: str                      # the suite whose folder holds it
    values: dict                    # RunConfig values
    label: str                      # how tables and plots name it
    kind: str = "train"             # "train", or "baseline" (built with `baseline`'s parts)
    needs: tuple[str, ...] = ()     # runs whose checkpoint it starts from
    full_last: int = 0
    note: str = ""
    baseline: Baseline | None = None


def seed_names(base: str, profile: Profile) -> list[str]:
    """The plan's names of one run at each of the profile's seeds (seed 0 keeps the plain name)."""
    return [base if seed == 0 else f"{base}_seed{seed}" for seed in profile.seeds]


def plan(profile: Profile) -> dict[str, RunSpec]:
    p = profile
    E, K = p.epochs, p.full_last
    common = {"model": p.model, "dataset": "fashion-mnist", "train_subset": p.train_subset,
              "test_subset": p.curve_subset, "test_batch_size": p.test_batch_size, "batch_size": 16, "seed": 0,
              "threads": p.threads, "accelerator": p.accelerator, "lr_schedule": p.lr_schedule,
              "validation_size": p.validation, "data_dir": p.data_dir, "bn_calibration": p.bn_calibration}

    def scratch(method: str, schedule: str, up: str, down: str, **more) -> dict:
        return {**common, "method": method, "schedule": schedule, "epochs": E, "dtype_up": up, "dtype_down": down,
                **more}

    def seeded(name: str, values: dict, label: str, needs: tuple[str, ...] = (), **more) -> list[RunSpec]:
        """The run at every seed of the profile: seed s > 0 is NAME_seedS and starts from its needs' seed-s run."""
        out = []
        for seed, own in zip(p.seeds, seed_names(name, p)):
            suffix = "" if seed == 0 else f", seed {seed}"
            need = tuple(seed_names(n, p)[p.seeds.index(seed)] for n in needs)
            out.append(RunSpec(own, values=({**values, "seed": seed}), label=label + suffix, needs=need, **more))
        return out

    chain = ",".join(f"{b}:1" for b in (64, 32, 16, 8, 4, 2, 1))
    specs = [
        # (a) deprune vs ca vs sl, paper Fig. 6 shapes, plus the run that pushes the traffic down
        *seeded("sl", scratch("sl", "all:22", "fp32", "fp32"), "sl (all, fp32/fp32)", suite="deprune", full_last=K,
                note="plain split learning: every channel, fp32 both ways"),
        *seeded("ca4", scratch("ca", "4:22", "fp16", "fp32", budget=4), "ca B=4 (fp16/fp32)", suite="deprune",
                full_last=K, note="compression-aware SL at a fixed budget of 4 from scratch (the paper's baseline)"),
        *seeded("deprune", scratch("deprune", "4:15,all:7", "fp16", "fp32"), "deprune 4->all (fp16/fp32)",
                suite="deprune", full_last=K,
                note="the paper's deprune: B=4 for 15/22 of the epochs, gate reset, then all channels"),
        *seeded("ca1_i8", scratch("ca", "1:22", "int8", "int8", budget=1), "ca B=1 (int8/int8)", suite="deprune",
                full_last=K, note="the extreme: one channel, int8 both ways (the 1000x training target)"),
        # (b) prune (transfer from the sl model) vs ca B=4 from scratch
        *seeded("prune", {**common, "method": "prune", "schedule": "32:10,4:10", "epochs": p.prune_epochs,
                          "dtype_up": "fp16", "dtype_down": "fp32"}, "prune 32->4 from sl", needs=("sl",),
                suite="prune", full_last=1,
                note="the paper's prune: from the sl model, B=32 then B=4, lr 1e-3, momentum 0.9"),
        # (c) resolution compression r=2 (the 4x4 cut travels as 3x3)
        *seeded("ca4_r2", scratch("ca", "4:22", "fp16", "fp32", budget=4, resolution=2), "ca B=4, r=2",
                suite="resolution", full_last=K, note="ca B=4 with resolution factor 2"),
        # (e) a dedicated ca model at every budget of the any-budget ladder (B=4 is the deprune suite's ca4)
        *[spec for b in (1, 2, 8, 16, 32, 64)
          for spec in seeded(f"ca{b}", scratch("ca", f"{b}:22", "fp16", "fp32", budget=b), f"ca B={b} (fp16/fp32)",
                             suite="adaptive", full_last=K,
                             note=f"compression-aware SL at a fixed budget of {b} from scratch (the any-budget "
                                  f"model's dedicated rival at B={b})")],
        # (f) one any-budget model for every budget (prefixes, sandwich rule on the server), same recipe as ca{B}
        *seeded("anybudget", scratch("anybudget", "all:22", "fp16", "fp32"), "anybudget (prefix, fp16/fp32)",
                suite="adaptive", full_last=K,
                note="one model whose first B channels serve every budget B: the device sends all channels, the "
                     "server trains on nested prefixes (1, all, one random ladder budget) of them"),
        # (g) the same at equal server work: one server optimizer step per batch, as every dedicated model takes
        *seeded("anybudget_1step", scratch("anybudget", "all:22", "fp16", "fp32", server_steps=1),
                "anybudget, one server step (prefix, fp16/fp32)", suite="adaptive", full_last=K,
                note="the any-budget run with --server-steps 1: the server's optimizer steps per batch of the "
                     "dedicated models (its objective still runs three prefixes)"),
        # (h) both with a decoder deconvolution per budget rung (--rung-decoder): a first server layer per budget
        *seeded("anybudget_rung", scratch("anybudget", "all:22", "fp16", "fp32", rung_decoder=True),
                "anybudget, a decoder per rung (prefix, fp16/fp32)", suite="adaptive", full_last=K,
                note="the any-budget run with --rung-decoder: each budget rung its own decoder deconvolution"),
        *seeded("anybudget_rung_1step", scratch("anybudget", "all:22", "fp16", "fp32", rung_decoder=True,
                                                server_steps=1),
                "anybudget, a decoder per rung, one server step (prefix, fp16/fp32)", suite="adaptive", full_last=K,
                note="--rung-decoder at one server optimizer step per batch, as the dedicated models take"),
        # (d) a trained model at every budget (prune chain from sl), and trained baselines (seed 0 only)
        RunSpec("chain", "rate", {**common, "method": "prune", "schedule": chain, "train_subset": p.chain_subset,
                                  "dtype_up": "fp16", "dtype_down": "fp32"}, "prune chain 64->1 from sl",
                needs=("sl",), note="prune from the sl model through B=64,32,...,1, one epoch of chain_subset each"),
        RunSpec("random2", "rate", {**common, "method": "prune", "schedule": f"2:{p.finetune_epochs}",
                                    "dtype_up": "fp16", "dtype_down": "fp32", "budget": 2},
                "random 2 channels (no gate)", kind="baseline", needs=("sl",),
                baseline=Baseline(selector=FixedRandomChannels(2)),
                note="2 channels chosen at random once (seeded), no top-B by the gate, no budget loss; "
                     "fine-tuned from the sl model with the prune recipe"),
        RunSpec("bottleneck2", "rate", {**common, "method": "sl", "schedule": f"all:{p.finetune_epochs}",
                                        "dtype_up": "fp16", "dtype_down": "fp32", "lr": 1e-3, "momentum": 0.9,
                                        "scaling": "binary"},
                "narrow bottleneck 2 ch (no gate)", kind="baseline", needs=("sl",),
                baseline=Baseline(bottleneck=NarrowBottleneck(2)),
                note="encoder conv 512->2 + BN + sigmoid, decoder deconv 2->512 + BN + ReLU, no gate; backbone "
                     "from the sl model, all fine-tuned with the prune recipe"),
    ]
    return {s.name: s for s in specs}


# ---------------------------------------------------------------------------------------------- paths
def run_dir(root: Path, spec: RunSpec) -> Path:
    return Path(root) / spec.suite / "runs" / spec.name


def run_config(spec: RunSpec, root: Path, specs: dict[str, RunSpec]):
    values = dict(spec.values)
    if spec.needs:
        values["from_checkpoint"] = str(run_dir(root, specs[spec.needs[0]]) / "checkpoint")
    return make_config(values)


def cli_command(spec: RunSpec, root: Path, specs: dict[str, RunSpec]) -> str:
    """The `splitprune train` command that trains this run (baselines need the bench: they change the model)."""
    if spec.kind != "train":
        return f"(baseline: trained by `splitprune bench {spec.suite}`)"
    cfg, default = run_config(spec, root, specs), RunConfig(method=spec.values["method"])
    flags = ["splitprune", "train", "--method", cfg.method]
    for name, (_, kind, _) in field_specs(RunConfig).items():  # every option that differs from its default
        flag, value = flag_name(RunConfig, name), getattr(cfg, name)
        if flag and kind is bool and value is True and getattr(default, name) is not True:
            flags.append(flag)   # a switch the run turns on (--rung-decoder)
        if not flag or kind not in (int, float, str):
            continue
        if name in ("model", "dataset", "schedule", "dtype_up", "dtype_down") or value != getattr(default, name):
            flags += [flag, str(value)]
    flags += ["--out", str(run_dir(root, spec))]
    return " ".join(shlex.quote(f) for f in flags)
