"""The training loop: phases of a schedule, per-epoch evaluation, metrics, checkpoints and resume."""
from __future__ import annotations

import csv
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from splitprune.adaptive.policy import StepBudget
from splitprune.compression.rungs import ladder
from splitprune.compression.tables import META_KEY as TABLES_KEY
from splitprune.compression.tables import count_symbols, tables_entries
from splitprune.wire.entropy import EC_DTYPES
from splitprune.config import Phase, RunConfig, resolve_schedule
from splitprune.data import DATASETS, validation_loader
from splitprune.errors import ProtocolError, UserError
from splitprune.training.checkpoint import (check_run_folder, check_start_budget, load_module, load_optimizer,
                                            module_tensors, optimizer_tensors, read_meta, read_tensors,
                                            write_checkpoint)
from splitprune.training.evaluation import evaluate, evaluate_budgets, progress_bar, short_run_warning
from splitprune.training.halves import check_halves, ec_positions
from splitprune.training.link import OptimizerSettings, lr_scale
from splitprune.training.records.journal import ByteJournal
from splitprune.training.records.summary import run_summary
from splitprune.training.setup import Endpoint, HalfSnapshot, LocalEndpoint, RunParts, build_run, input_channels
from splitprune.wire.accounting import add_counts

METRIC_FIELDS = ["epoch", "phase", "budget", "train_loss", "train_accuracy", "test_accuracy", "bytes_up", "bytes_down",
                 "eval_bytes_up", "eval_bytes_down", "seconds", "eval_seconds", "calibration_bytes_up",
                 "calibration_bytes_down"]


@dataclass
class Progress:
    phase: int = 0
    epoch_in_phase: int = 0
    epoch: int = 0
    rows: list[dict] = field(default_factory=list)
    wall_seconds: float = 0.0      # the whole run, every process of it (setup, steps, evaluation, checkpoints)
    last_eval: dict = field(default_factory=dict)
    transport: dict | None = None  # network traffic of the processes before this one (remote runs)
    budget_validation: dict | None = None   # anybudget: validation accuracy per ladder budget, after the last epoch
    journal: dict | None = None    # remote runs: what `transport` holds of each process (records/journal.py)


EpochCallback = Callable[["Trainer", dict], None]


class Trainer:
    """Runs a method's schedule; `endpoint` is where the server half lives (in-process by default).

    `callbacks` run after every epoch's evaluation, before its checkpoint, with the trainer and the epoch's
    metrics row (e.g. an extra evaluation on more test data); they must not change training. `step_budget`
    picks the channels of every training step (`train --budget auto`; default: the phase's budget). With
    `checkpoints=False` nothing is saved (measurement runs). `log` receives the trainer's messages
    (default: shown with the progress bars, silent without them).
    """

    def __init__(self, cfg: RunConfig, out: str | Path, endpoint: Endpoint | None = None,
                 parts: RunParts | None = None, show_progress: bool = True,
                 callbacks: Sequence[EpochCallback] = (), checkpoints: bool = True,
                 log: Callable[[str], None] | None = None, step_budget: StepBudget | None = None) -> None:
        self.cfg = cfg
        self.out = Path(out)
        if cfg.dtype_up in EC_DTYPES:
            raise UserError(f"--dtype-up {cfg.dtype_up} codes with the entropy tables a trained model holds: train "
                            "with another uplink dtype (the tables are counted at the end of training), then "
                            f"evaluate, infer or export with --dtype-up {cfg.dtype_up}")
        channels = check_halves(cfg, input_channels(cfg), DATASETS[cfg.dataset].num_classes).channels
        self.phases = resolve_schedule(cfg, channels)  # refuse a bad schedule before any data or model is built
        if cfg.method == "prune":
            check_start_budget(cfg.from_checkpoint, self.phases[0].budget or channels)
        check_run_folder(cfg, self.out)
        self._clock = min(time.perf_counter(), getattr(endpoint, "opened_at", math.inf))  # connecting counts too
        self._wall_before = 0.0  # wall seconds of earlier processes of this run
        self.parts = parts or build_run(cfg, server=endpoint is None)  # a remote run builds the device side only
        self.endpoint = endpoint or LocalEndpoint(self.parts.server_worker)
        self.device = self.parts.device
        self.show_progress = show_progress
        self.progress = Progress()
        self.callbacks, self.checkpoints, self.log = tuple(callbacks), checkpoints, log
        self.step_budget = step_budget
        self._writer = None
        self.journal: ByteJournal | None = None
        for note in self.parts.notes:  # said even when quiet: the user decides what to do about them
            (self.log or (lambda m: print(m, file=sys.stderr)))(f"note: {note}")

    # ---------------------------------------------------------------- checkpoints
    def _meta(self, server_half: HalfSnapshot) -> dict:
        geometry = self.parts.geometry
        progress = self._clock_wall()
        return {
            "config": self.cfg.to_dict(), "fingerprint": self.cfg.fingerprint(), "num_classes": self.parts.num_classes,
            "in_channels": self.parts.in_channels, "cut_shape": list(geometry.cut_shape),
            "wire_shape": list(geometry.wire_shape), "budget": self.device.budget or geometry.channels,
            "phases": [{"budget": p.label(), "epochs": p.epochs} for p in self.phases],
            "server_half": server_half.identity,
            "progress": {"phase": progress.phase, "epoch_in_phase": progress.epoch_in_phase,
                         "epoch": progress.epoch, "wall_seconds": progress.wall_seconds, "rows": progress.rows,
                         "last_eval": progress.last_eval, "transport": self.transport(),
                         "journal": self.journal.included(self.endpoint.transport_stats()) if self.journal else None,
                         **({"step_budgets": {str(b): n for b, n in self.step_budget.steps_per_budget().items()}}
                            if self.step_budget is not None else {})},
            **({"budget_validation": progress.budget_validation} if progress.budget_validation else {}),
        }

    def _clock_wall(self) -> Progress:
        """Bring progress.wall_seconds up to now: earlier processes' time plus this one's so far."""
        self.progress.wall_seconds = self._wall_before + time.perf_counter() - self._clock
        return self.progress

    def _model_and_state(self, keep: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
        """Model weights (device.*, and server.* when the half is here), training state, meta.

        A remote server saves its half where it runs; `keep` asks it to keep that save past its rotation."""
        server = self.endpoint.checkpoint(self.device.step_id, keep)
        model = {**module_tensors("device", self.device.half),
                 **{k: v for k, v in server.tensors.items() if k.startswith("server.")}}
        state = {k: v for k, v in server.tensors.items() if not k.startswith("server.")}
        state.update(optimizer_tensors("opt.device", self.device.optimizer, self.device.half))
        state["rng.device"] = self.device.rng.state.clone()
        state["step_id"] = torch.tensor([self.device.step_id], dtype=torch.int64)
        return model, state, self._meta(server)

    def _save(self) -> None:
        if not self.checkpoints:
            return
        model, state, meta = self._model_and_state()
        if self.progress.phase >= len(self.phases):  # trained: freeze the entropy tables (--dtype-up ec)
            meta[TABLES_KEY] = self._ec_tables()
        write_checkpoint(self.out / "checkpoint", model, meta, state)

    def _ec_tables(self) -> list[dict]:
        """Symbol counts of every channel over the training set (the device half in eval mode), as tables, one
        set per grid."""
        batches, shape = (self.device.cut_values(x) for x, _ in self.parts.train_loader), self.parts.geometry
        positions = ec_positions(self.cfg.ec_prior, shape)
        return tables_entries(count_symbols(batches, shape.wire_shape[0], positions=positions))

    def _resume(self) -> bool:
        if not (self.out / "checkpoint" / "meta.json").exists():
            return False
        meta = read_meta(self.out / "checkpoint")
        saved = meta["progress"]
        self.progress = Progress(saved["phase"], saved["epoch_in_phase"], saved["epoch"], saved["rows"],
                                 saved["wall_seconds"], saved.get("last_eval", {}), saved.get("transport"),
                                 meta.get("budget_validation"), saved.get("journal") or {})
        self._wall_before = saved["wall_seconds"]
        model = read_tensors(meta["_folder"])
        state = read_tensors(meta["_folder"], "state.safetensors")
        step_id = int(state["step_id"][0])
        record = HalfSnapshot({k: v for k, v in {**model, **state}.items()
                                   if k.startswith(("server.", "opt.server.", "rng.server"))}, meta.get("server_half"))
        if self.progress.phase < len(self.phases):
            self._start_phase(self.progress.phase, fresh=False)
        load_module("device", self.device.half, model)
        if self.device.optimizer is not None:
            load_optimizer("opt.device", self.device.optimizer, self.device.half, state)
        self.device.rng.state = state["rng.device"].clone()
        self.device.step_id = step_id
        self.endpoint.restore(record, step_id)
        if self.step_budget is not None:   # the eval budget counts the steps before the resume too
            self.step_budget.resume({int(b): int(n) for b, n in saved.get("step_budgets", {}).items()})
        return True

    # ---------------------------------------------------------------- phases
    def _optimizer(self) -> OptimizerSettings:
        return OptimizerSettings(self.cfg.lr_value(), self.cfg.momentum_value(), self.cfg.weight_decay)

    def _start_phase(self, index: int, fresh: bool) -> None:
        phase = self.phases[index]
        if fresh and self.cfg.method == "deprune" and index > 0 and self._relaxes(index):
            opened = self.device.reset_gate(self.cfg.reset_threshold, self.cfg.reset_low, self.cfg.reset_high)
            self._log(f"phase {index}: budget relaxed to {phase.label()}; gate reset, {opened} channels kept open")
        self.device.start_phase(self.endpoint.link, index, phase.budget, self._optimizer(),
                                use_budget_loss=self.cfg.method != "sl")

    def _relaxes(self, index: int) -> bool:
        big = self.parts.geometry.channels
        before, now = self.phases[index - 1].budget or big, self.phases[index].budget or big
        return now > before

    # ---------------------------------------------------------------- loop
    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        phase_started = self._resume()  # a resumed run restarts its current phase while loading
        self.journal = ByteJournal.for_run(self.out, self.endpoint, self.progress.journal if phase_started else None)
        if phase_started:
            self._log(f"resuming {self.out} after epoch {self.progress.epoch}")
        self._open_tensorboard()
        advice = short_run_warning(self.cfg, len(self.parts.train_loader) * sum(p.epochs for p in self.phases))
        if advice:
            self._log(f"warning: {advice}")
        while self.progress.phase < len(self.phases):
            phase = self.phases[self.progress.phase]
            if not phase_started:
                self._start_phase(self.progress.phase, fresh=True)
            phase_started = False
            while self.progress.epoch_in_phase < phase.epochs:
                self._run_epoch(phase)
            if self.cfg.method == "prune":
                self._save_phase_model(phase)
            self.progress.phase += 1
            self.progress.epoch_in_phase = 0
            if self.progress.phase < len(self.phases):  # start it before saving: a resume lands after the reset
                self._start_phase(self.progress.phase, fresh=True)
                phase_started = True
            self._save()
        if self._ranks_budgets() and self.progress.budget_validation is None:
            self.progress.budget_validation = self._validate_budgets()
            self._save()
        self._clock_wall()
        summary = self.summary()
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        if self.journal is not None:
            self.journal.close()
        return summary

    def _ranks_budgets(self) -> bool:
        return self.cfg.method == "anybudget" and self.cfg.validation_size > 0 and self.checkpoints

    def _validate_budgets(self) -> dict:
        """What `--budget auto` ranks its options by (adaptive.budgets.budget_quality): the final model's
        accuracy at every budget of the ladder on the held-out validation images, never the test set."""
        cfg = self.cfg
        loader = validation_loader(cfg.dataset, cfg.data_dir, cfg.input_size, self.parts.in_channels,
                                   cfg.validation_size, cfg.test_batch_size, cfg.normalisation())
        results = evaluate_budgets(self.device, self.endpoint.link, loader, ladder(self.parts.geometry.channels),
                                   self.show_progress)
        accuracy = {b: r.accuracy for b, r in results.items()}
        self._log("validation accuracy per budget: "
                  + ", ".join(f"B={b} {100 * a:.2f}%" for b, a in accuracy.items()))
        return {"samples": len(loader.dataset.labels), "dtype_up": cfg.dtype_up,
                "accuracy": {str(b): round(a, 6) for b, a in accuracy.items()}}

    def _run_epoch(self, phase: Phase) -> None:
        p = self.progress
        loader = self.parts.train_loader
        loader.set_epoch(p.epoch)
        totals = {"samples": 0, "loss": 0.0, "correct": 0, "up": 0, "down": 0}
        start = time.perf_counter()
        bar = progress_bar(loader, f"epoch {p.epoch + 1} B={phase.label()}", self.show_progress)
        done = p.epoch_in_phase * len(loader)
        for index, (x, y) in enumerate(bar):
            scale = lr_scale(self.cfg.lr_schedule, done + index, phase.epochs * len(loader))
            try:
                stats = self.device.train_step(x, y, self.endpoint.link, scale, self.step_budget)
            except ProtocolError as exc:
                raise UserError(f"training step failed: {exc}") from None
            totals["samples"] += stats.samples
            totals["loss"] += stats.loss * stats.samples
            totals["correct"] += stats.correct
            totals["up"] += stats.bytes_up
            totals["down"] += stats.bytes_down
            self._journal_bytes()
            bar.set_postfix(loss=f"{totals['loss'] / totals['samples']:.3f}",
                            acc=f"{totals['correct'] / totals['samples']:.3f}",
                            up=_megabytes(totals["up"]), down=_megabytes(totals["down"]),
                            refresh=False)  # the bar redraws at its own interval: logs stay short
        seconds = time.perf_counter() - start
        eval_budget = None if self.step_budget is None else self.step_budget.eval_budget()
        calibration = self.device.calibrate(self.parts.calibration, self.endpoint.link, eval_budget)
        result = evaluate(self.device, self.endpoint.link, self.parts.test_loader, eval_budget,
                          progress=self.show_progress)
        eval_seconds = time.perf_counter() - start - seconds
        self._journal_bytes()
        n = max(totals["samples"], 1)
        row = {"epoch": p.epoch + 1, "phase": p.phase, "budget": phase.label(),
               "train_loss": round(totals["loss"] / n, 6), "train_accuracy": round(totals["correct"] / n, 6),
               "test_accuracy": round(result.accuracy, 6), "bytes_up": totals["up"], "bytes_down": totals["down"],
               "eval_bytes_up": result.bytes_up, "eval_bytes_down": result.bytes_down,
               "seconds": round(seconds, 3), "eval_seconds": round(eval_seconds, 3),
               "calibration_bytes_up": calibration[0], "calibration_bytes_down": calibration[1]}
        p.rows.append(row)
        p.last_eval = {"samples": result.samples, "bytes_up": result.bytes_up,
                       "single_sample_bytes_up": result.single_sample_bytes_up, "budget": phase.label()}
        p.epoch += 1
        p.epoch_in_phase += 1
        self._write_metrics()
        for callback in self.callbacks:
            callback(self, row)
        self._save()
        self._log(f"epoch {row['epoch']} B={row['budget']}: loss {row['train_loss']:.4f} "
                  f"test acc {row['test_accuracy']:.4f} up {_megabytes(row['bytes_up'])} "
                  f"down {_megabytes(row['bytes_down'])} ({seconds:.1f}s + eval {eval_seconds:.1f}s)")
        if self._writer is not None:
            for key in ("train_loss", "train_accuracy", "test_accuracy", "bytes_up", "bytes_down"):
                self._writer.add_scalar(key, row[key], row["epoch"])

    def _journal_bytes(self) -> None:
        if self.journal is not None:
            self.journal.record(self.endpoint.transport_stats())

    def _save_phase_model(self, phase: Phase) -> None:
        if not self.checkpoints:
            return
        model, _, meta = self._model_and_state(keep=True)
        meta["budget"] = phase.budget or self.parts.geometry.channels
        write_checkpoint(self.out / "models" / f"budget_{phase.label()}", model, meta)

    def _write_metrics(self) -> None:
        with open(self.out / "metrics.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=METRIC_FIELDS)
            writer.writeheader()
            writer.writerows(self.progress.rows)

    def _open_tensorboard(self) -> None:
        if not self.cfg.tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        self._writer = SummaryWriter(str(self.out / "tensorboard"))

    def _log(self, message: str) -> None:
        if self.log is not None:
            self.log(message)
        elif self.show_progress:
            tqdm.write(message)

    # ---------------------------------------------------------------- results
    def summary(self) -> dict:
        return {**run_summary(self.cfg, self.phases, self.progress, len(self.parts.train_loader.dataset.labels),
                              self.parts.geometry),
                "transport": self.transport() if self.journal is None else
                {**self.transport(), "discarded": self.journal.discarded},
                **({"budget_auto": self._auto_summary()} if self.step_budget is not None else {})}

    def _auto_summary(self) -> dict:
        steps = self.step_budget.steps_per_budget()
        return {"steps_per_budget": {str(b): n for b, n in steps.items()}, "eval_budget": self.step_budget.eval_budget()}

    def transport(self) -> dict | None:
        """Network traffic of the whole run (this process's plus the earlier ones'); None in-process."""
        stats = getattr(self.endpoint, "transport_stats", None)
        if stats is None:
            return self.progress.transport
        return add_counts(self.progress.transport, stats())


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.2f}MB"
