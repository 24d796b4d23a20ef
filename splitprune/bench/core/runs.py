"""Training the runs of the plan (splitprune.bench.core.plan), resumable, and reading them back.

Every run is a `Trainer` run in this process. A run whose summary.json exists is not trained again; an
interrupted run resumes from its checkpoint. On top of the trainer's per-epoch evaluation (on `curve_subset`
test images, for the curves) the last `full_last` epochs of a run (quick profile: the last one) are also
evaluated on the full test set (full_test.json, by a Trainer callback); the headline accuracy of a run is that
of the model it ends with. The extra evaluation does not change training, so `splitprune train` with the
run's recorded command reproduces the run itself.
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import time
from pathlib import Path

from splitprune.bench.core.plan import RunSpec, cli_command, plan, run_config, run_dir
from splitprune.bench.core.profiles import Profile
from splitprune.config import RunConfig, make_config, resolve_schedule, stored_config
from splitprune.errors import UserError
from splitprune.flags import add_flags, flag_values


class FullTestEvaluation:
    """Trainer callback: the last `last` epochs also evaluated on the full test set (full_test.json).

    It only reads the model, so training is the same with or without it."""

    def __init__(self, out: Path, loader, total_epochs: int, last: int) -> None:
        self.path, self.loader, self.total_epochs, self.last = Path(out) / "full_test.json", loader, total_epochs, last
        self.records = json.loads(self.path.read_text()) if self.path.exists() else []

    def __call__(self, trainer, row: dict) -> None:
        from splitprune.training.evaluation import evaluate

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
    from splitprune.bench.paper import baselines

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
        made = stored_config({k: v for k, v in saved.items() if k in want})
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
        parser = argparse.ArgumentParser()
        add_flags(parser, RunConfig)
        parser.add_argument("--out")
        cfg = make_config(flag_values(parser.parse_args(shlex.split(text)[2:]), RunConfig))
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
