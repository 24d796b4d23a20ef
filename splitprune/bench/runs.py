"""The training runs behind the benchmark suites: one plan per profile, shared between suites, resumable.

Every run is a `Trainer` run (in this process) with its own folder ROOT/SUITE/runs/NAME, where SUITE is
the suite that owns it (e.g. the sl run lives under deprune/ and is the baseline of prune and rate too).
A run whose summary.json exists is not trained again; an interrupted run resumes from its checkpoint.

On top of the trainer's per-epoch evaluation (on `curve_subset` test images, for the curves) the last
`full_last` epochs of a run (quick profile: the last one) are also evaluated on the full test set
(full_test.json, by a Trainer callback); the headline accuracy of a run is that of the model it ends
with. Headline runs are trained at each of the profile's seeds (NAME, NAME_seed1); verdicts take the
worse of the seeds (splitprune.bench.verdict). The extra evaluation does not change training, so
`splitprune train` with the run's recorded command reproduces the run itself. Every run holds out
`validation` training images (the same ones for every seed) for choosing configurations.

Profiles: `quick` (CPU, vgg11_bn_compact, a Fashion-MNIST subset, schedules of the paper's shape scaled
to a few epochs) and `paper` (vgg11_bn and the paper's schedules, for a GPU). Settings on top of a
profile (`get_profile` arguments; flags of `splitprune bench` and of this module): --smoke (tiny sizes:
tests and dry runs), --train-subset N, --epochs E (from-scratch epochs; the other schedules scale with
it), --threads T, --data-dir DIR (where the Fashion-MNIST IDX files are), --no-train (never train:
report what is there, partial runs included; used after a time-boxed GPU run), --use-partial (a run
started from another one's checkpoint uses that checkpoint even if its run did not finish, instead of
finishing it first).

`python -m splitprune.bench.runs --profile paper --out DIR NAME...` trains named runs (for parallel
processes on one machine); `--suite SUITE...` runs suites' reports (without importing the CLI, whose
transport commands need grpc); `--list` prints the plan with each run's `splitprune train` command.
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from splitprune.compression.bottleneck import FixedRandomChannels, NarrowBottleneck
from splitprune.bench.baselines import Baseline
from splitprune.config import make_config, resolve_schedule
from splitprune.errors import UserError

PAPER_EPOCHS = 22  # sl / ca / deprune epochs in the paper (Fig. 6)


@dataclass(frozen=True)
class Profile:
    name: str
    model: str
    train_subset: int | None      # training images (stratified subset); None = all 60k
    curve_subset: int | None      # test images of the per-epoch evaluation (curves); None = all 10k
    full_subset: int | None       # test images of the headline evaluations; None = all 10k
    full_last: int                # last epochs of a headline run also evaluated on the full test set (1: the final model)
    epochs: int                   # from-scratch runs (sl, ca, deprune); paper: 22
    prune_epochs: int             # prune 32:x,4:x from the sl model; paper: 20
    chain_subset: int | None      # training images per phase of the rate suite's prune chain (1 epoch each)
    finetune_epochs: int          # rate baselines fine-tuned from the sl model (about the chain's samples to B=2)
    threads: int | None
    accelerator: str
    test_batch_size: int
    topk: tuple[int, ...]         # top-k baseline: values kept per sample
    link_steps: int               # time-to-accuracy suite: training steps measured through the link
    lr_schedule: str = "constant" # the paper's constant lr, or "cosine" per phase (quick: short runs settle)
    chain_dtypes: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")  # dtypes the rate suite evaluates chain models at
    validation: int = 2000        # training images held out for choosing configurations (never trained on)
    seeds: tuple[int, ...] = (0, 1)  # every headline run at each seed
    smoke: bool = False
    data_dir: str | None = None   # where the dataset's files are; None = the dataset's standard place
    no_train: bool = False        # never train: report what is there (partial runs too, other settings with a warning)
    use_partial: bool = False     # a run that starts from another's checkpoint takes it even if that run did not finish

    def settings(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def get_profile(name: str, *, smoke: bool = False, train_subset: int | None = None, epochs: int | None = None,
                threads: int | None = None, data_dir: str | None = None, no_train: bool = False,
                use_partial: bool = False) -> Profile:
    """The named profile with these settings on top (None / False: the profile's own)."""
    for setting, value in (("train_subset", train_subset), ("epochs", epochs), ("threads", threads)):
        if value is not None and value < 1:
            raise UserError(f"{setting} must be a positive integer, got {value}")
    try:
        import torch
        cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        cuda = False
    if name == "quick":
        p = Profile("quick", "vgg11_bn_compact", train_subset=2500, curve_subset=1000, full_subset=None, full_last=1,
                    epochs=4, prune_epochs=2, chain_subset=1000, finetune_epochs=2, threads=2, accelerator="cpu",
                    test_batch_size=256, topk=(8, 32, 512), link_steps=30, lr_schedule="cosine",
                    chain_dtypes=("int8", "int4"))
    elif name == "paper":
        p = Profile("paper", "vgg11_bn", train_subset=4000, curve_subset=2000, full_subset=None, full_last=1,
                    epochs=PAPER_EPOCHS, prune_epochs=20, chain_subset=2000, finetune_epochs=3, threads=2,
                    accelerator="cuda" if cuda else "cpu", test_batch_size=500, topk=(4, 8, 32, 128, 512),
                    link_steps=30)
    else:
        raise UserError(f"unknown profile {name!r}: quick or paper")
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


# ---------------------------------------------------------------------------------------------- plan
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
              "validation_size": p.validation, "data_dir": p.data_dir}

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
    from splitprune.cli.common import CONFIG_FLAGS
    from splitprune.config import RunConfig

    cfg, default = run_config(spec, root, specs), RunConfig(method=spec.values["method"])
    flags = ["splitprune", "train", "--method", cfg.method]
    for flag, (name, _, _) in CONFIG_FLAGS.items():  # every option that differs from its default
        value = getattr(cfg, name)
        if name in ("model", "dataset", "schedule", "dtype_up", "dtype_down") or value != getattr(default, name):
            flags += [flag, str(value)]
    flags += ["--out", str(run_dir(root, spec))]
    return " ".join(shlex.quote(f) for f in flags)


# ---------------------------------------------------------------------------------------------- training
class FullTestEvaluation:
    """Trainer callback: the last `last` epochs also evaluated on the full test set (full_test.json).

    It only reads the model, so training is the same with or without it."""

    def __init__(self, out: Path, loader, total_epochs: int, last: int) -> None:
        self.path, self.loader, self.total_epochs, self.last = Path(out) / "full_test.json", loader, total_epochs, last
        self.records = json.loads(self.path.read_text()) if self.path.exists() else []

    def __call__(self, trainer, row: dict) -> None:
        from splitprune.training.trainer import evaluate

        if row["epoch"] <= self.total_epochs - self.last:
            return
        start = time.perf_counter()
        result = evaluate(trainer.device, trainer.endpoint.link, self.loader)
        record = {"epoch": row["epoch"], "budget": row["budget"], "accuracy": result.accuracy,
                  "samples": result.samples, "bytes_per_sample": result.bytes_up / max(result.samples, 1),
                  "single_sample_bytes": result.single_sample_bytes_up,
                  "seconds": round(time.perf_counter() - start, 3)}
        self.records = [r for r in self.records if r["epoch"] != row["epoch"]] + [record]
        self.path.write_text(json.dumps(self.records, indent=2))
        print(f"[{self.path.parent.name}] epoch {row['epoch']} on the full test set ({result.samples} images): "
              f"{100 * result.accuracy:.2f}%", flush=True)


def cut_channels(cfg) -> int:
    from splitprune.models import cut_shape
    from splitprune.training.setup import input_channels

    return cut_shape(cfg.model, cfg.split, input_channels(cfg), cfg.input_size)[0]


def full_test_loader(cfg, profile: Profile):
    """The headline test loader: `full_subset` test images (None = all), at the profile's test batch size."""
    from splitprune.data import BatchLoader, dataset_info, load_split, subset
    from splitprune.training.setup import input_channels

    info = dataset_info(cfg.dataset)  # the test split only, exactly as make_loaders prepares it
    channels = input_channels(cfg)
    load_size = cfg.input_size if info.native_size is None else None
    test = subset(load_split(cfg.dataset, cfg.data_dir, False, load_size,
                             channels if info.name == "folder" else info.in_channels), profile.full_subset, cfg.seed)
    return BatchLoader(test, profile.test_batch_size, cfg.input_size, channels, info.mean, info.std, shuffle=False,
                       augment=False, seed=cfg.seed)


def train(spec: RunSpec, profile: Profile, root: Path, specs: dict[str, RunSpec]) -> dict:
    """Train one run (resuming a partial one); returns its summary."""
    from splitprune.bench import baselines

    cfg = run_config(spec, root, specs)
    out = run_dir(root, spec)
    out.mkdir(parents=True, exist_ok=True)
    command = cli_command(spec, root, specs)
    (out / "command.txt").write_text(command + "\n")
    parts = baselines.build_parts(cfg, spec.baseline) if spec.kind != "train" else None
    from splitprune.training.trainer import Trainer

    callbacks, full = [], None
    if spec.full_last and profile.full_subset != cfg.test_subset:
        total = sum(p.epochs for p in resolve_schedule(cfg, cut_channels(cfg)))
        full = FullTestEvaluation(out, full_test_loader(cfg, profile), total, spec.full_last)
        callbacks.append(full)
    trainer = Trainer(cfg, out, parts=parts, show_progress=False, callbacks=callbacks,
                      log=lambda message: print(f"[{out.name}] {message}", flush=True))
    (out / "run.json").write_text(json.dumps(run_info(cfg, trainer), indent=2))
    print(f"== run {spec.name}: {spec.label} -> {out}", flush=True)
    summary = trainer.run()
    summary["bench"] = {"name": spec.name, "label": spec.label, "kind": spec.kind, "note": spec.note,
                        "full_test": full.records if full else [], "command": command,
                        "profile": profile.settings()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def ensure(name: str, profile: Profile, root: Path) -> dict:
    """The run's record: its summary if finished, else train it (and what it starts from) first.

    With the profile's no_train set, nothing is trained: a partial run is read from its last checkpoint
    (marked complete=False) and a missing one raises UserError.
    """
    specs = plan(profile)
    spec = specs[name]
    record = load_record(spec, root)
    if record is not None and record["complete"]:
        _check_planned(record, run_config(spec, root, specs), profile.no_train)
        return record
    if profile.no_train:
        if record is None:
            raise UserError(f"run {name} has not been trained under {run_dir(root, spec)}")
        return record
    for need in spec.needs:
        needed = load_record(specs[need], root)
        if not (profile.use_partial and needed is not None and needed["rows"]):
            ensure(need, profile, root)
    train(spec, profile, root, specs)
    return load_record(spec, root)


def _check_planned(record: dict, planned, no_train: bool = False) -> None:
    """A finished run is reused only if the plan would train it the same way (else its numbers are stale);
    with `no_train` (reading results back) it is reported anyway, with a warning."""
    saved = record["summary"].get("config") or {}
    want = planned.to_dict()
    try:
        made = make_config({k: v for k, v in saved.items() if k in want})
    except UserError:
        made = None
    if made is not None and made.fingerprint() == planned.fingerprint():
        return
    have = made.to_dict() if made is not None else saved
    differ = sorted(k for k, v in want.items()
                    if have.get(k) != v and k not in ("data_dir", "threads", "accelerator", "tensorboard"))
    message = (f"{record['dir']} holds run {record['name']} made with other settings ({', '.join(differ) or 'config'}) "
               "than this profile plans")
    if no_train:
        print(f"warning: {message}; reported as it is", flush=True)
        return
    raise UserError(f"{message}: remove that folder or give another --out")


def load_record(spec: RunSpec, root: Path) -> dict | None:
    """What the suites read of a run: summary (or progress so far), metric rows and full-test evaluations.

    A finished run has summary.json. A stopped one is read from its checkpoint's meta.json, or (results
    copied without weights) from run.json + metrics.csv, or from the plan + metrics.csv; complete=False.
    """
    out = run_dir(root, spec)
    rows = []
    if (out / "metrics.csv").exists():
        with open(out / "metrics.csv") as fh:
            rows = [_numbers(r) for r in csv.DictReader(fh)]
    summary_path, meta_path, info_path = out / "summary.json", out / "checkpoint" / "meta.json", out / "run.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        complete = True
    elif meta_path.exists() or info_path.exists() or rows:
        if meta_path.exists():
            info = json.loads(meta_path.read_text())
            rows = info["progress"]["rows"]
        elif info_path.exists():
            info = json.loads(info_path.read_text())
        else:
            info = _planned_info(spec, out / "command.txt")
        cfg = info["config"]
        tested = cfg.get("test_subset") or 10000  # Fashion-MNIST's test set
        summary = {"method": cfg["method"], "config": cfg, "epochs": len(rows),
                   "bytes_up": sum(r["bytes_up"] for r in rows), "bytes_down": sum(r["bytes_down"] for r in rows),
                   "wall_seconds": sum(r["seconds"] + r["eval_seconds"] for r in rows),
                   "wire_shape": info.get("wire_shape"), "train_samples": cfg.get("train_subset") or 60000,
                   "final_budget": rows[-1]["budget"] if rows else None,
                   "inference_bytes_per_sample": rows[-1]["eval_bytes_up"] / tested if rows else None,
                   "phases": info.get("phases", [])}
        complete = False
    else:
        return None
    full = json.loads((out / "full_test.json").read_text()) if (out / "full_test.json").exists() else []
    planned = sum(int(p["epochs"]) for p in summary.get("phases", [])) or None
    return {"name": spec.name, "label": spec.label, "spec": spec, "dir": out, "summary": summary, "rows": rows,
            "planned_epochs": planned, "full_test": full, "complete": complete,
            "command": (out / "command.txt").read_text().strip() if (out / "command.txt").exists() else ""}


def run_info(cfg, trainer) -> dict:
    """run.json: what a stopped run's results need when its checkpoint is not there (copied without weights)."""
    return {"config": cfg.to_dict(), "phases": [{"budget": p.label(), "epochs": p.epochs} for p in trainer.phases],
            "cut_shape": list(trainer.parts.geometry.cut_shape), "wire_shape": list(trainer.parts.geometry.wire_shape)}


def _planned_info(spec: RunSpec, command: Path) -> dict:
    """A stopped run's config and phases from its recorded `splitprune train` command, else from the plan
    (for results copied without weights from before run.json existed)."""
    from splitprune.compression import encoded_shape
    from splitprune.models import cut_shape

    cfg = None
    text = command.read_text().strip() if command.exists() else ""
    if text.startswith("splitprune train "):
        from splitprune.cli.common import add_config_flags, config_from_args
        parser = argparse.ArgumentParser()
        add_config_flags(parser)
        parser.add_argument("--out")
        cfg = config_from_args(parser.parse_args(shlex.split(text)[2:]))
    if cfg is None:
        values = dict(spec.values)
        if spec.needs:
            values["from_checkpoint"] = f"(the {spec.needs[0]} run's checkpoint)"
        cfg = make_config(values)
    cut = cut_shape(cfg.model, cfg.split, 1, cfg.input_size)
    phases = resolve_schedule(cfg, cut[0])
    wire = encoded_shape(cut, cfg.resolution)
    if spec.baseline is not None and spec.baseline.bottleneck is not None:
        wire = (spec.baseline.bottleneck.width, *wire[1:])
    return {"config": cfg.to_dict(), "phases": [{"budget": p.label(), "epochs": p.epochs} for p in phases],
            "wire_shape": list(wire)}


def _numbers(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = v
    return out


def headline_accuracy(record: dict) -> tuple[float | None, str]:
    """The accuracy of the model the run ends with (its last full-test evaluation), and how it was measured.

    Without a full-test evaluation: its last epoch on the curve test subset, said so."""
    full = record["full_test"]
    if full:
        last = full[-1]
        return last["accuracy"], f"final model (epoch {last['epoch']}), {last['samples']} test images"
    rows = record["rows"]
    if not rows:
        return None, "no epoch finished"
    subset = record["summary"]["config"].get("test_subset")
    where = "all test images" if subset is None else f"{subset} test images"
    return rows[-1]["test_accuracy"], f"final model (epoch {rows[-1]['epoch']}), {where}"


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from splitprune.cli.bench import add_profile_flags  # the CLI's bench module imports neither torch nor grpc

    parser = argparse.ArgumentParser(prog="python -m splitprune.bench.runs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="runs to train (default: all, in plan order)")
    parser.add_argument("--profile", choices=["quick", "paper"], default="quick",
                        help="quick: CPU, Fashion-MNIST subset, vgg11_bn_compact (default); paper: vgg11_bn (GPU)")
    parser.add_argument("--out", default="bench_results", help="results root (suites' folders inside)")
    parser.add_argument("--list", action="store_true", help="print the plan and each run's command")
    parser.add_argument("--suite", nargs="+", metavar="SUITE", help="run these suites' reports instead "
                        "(deprune, prune, resolution, rate, link_time, step); each failure is reported, "
                        "the others still run")
    add_profile_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from splitprune.cli.bench import profile_from_args

    args = build_parser().parse_args(argv)
    try:
        profile = profile_from_args(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    specs = plan(profile)
    root = Path(args.out)
    if args.suite:
        import importlib
        import traceback
        failed = []
        for suite in args.suite:
            folder = {"link_time": "link"}.get(suite, suite)
            print(f"== suite {suite} ({args.profile}) ==", flush=True)
            try:
                importlib.import_module(f"splitprune.bench.{suite}").run(profile, root / folder)
            except Exception:  # noqa: BLE001 - one suite's failure must not lose the others' results
                traceback.print_exc()
                failed.append(suite)
        if failed:
            print(f"failed suites: {failed}", file=sys.stderr)
        return 1 if failed else 0
    names = args.names or list(specs)
    unknown = [n for n in names if n not in specs]
    if unknown:
        print(f"unknown run(s) {unknown}; the plan has {list(specs)}", file=sys.stderr)
        return 2
    if args.list:
        for name in names:
            print(f"{name:14s} [{specs[name].suite}] {specs[name].label}\n    {cli_command(specs[name], root, specs)}")
        return 0
    try:
        for name in names:
            ensure(name, profile, root)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
