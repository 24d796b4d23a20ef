"""A run's summary.json numbers from its per-epoch rows (the trainer adds the traffic on the wire)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from splitprune.config import Phase, RunConfig


def run_summary(cfg: RunConfig, phases: Sequence[Phase], progress, train_samples: int, geometry) -> dict:
    rows = progress.rows
    accuracies = [r["test_accuracy"] for r in rows]
    last = progress.last_eval
    per_phase = []
    for index, phase in enumerate(phases):
        own = [r for r in rows if r["phase"] == index]
        per_phase.append({"budget": phase.label(), "epochs": phase.epochs,
                          "bytes_up": sum(r["bytes_up"] for r in own), "bytes_down": sum(r["bytes_down"] for r in own),
                          "final_test_accuracy": own[-1]["test_accuracy"] if own else None})
    return {
        "method": cfg.method, "model": cfg.model, "split": cfg.split, "dataset": cfg.dataset,
        "epochs": len(rows), "train_samples": train_samples, "test_samples": last.get("samples"),
        "final_test_accuracy": accuracies[-1] if accuracies else None,
        "best_test_accuracy": max(accuracies) if accuracies else None,
        "mean_last3_test_accuracy": sum(accuracies[-3:]) / len(accuracies[-3:]) if accuracies else None,
        "bytes_up": sum(r["bytes_up"] for r in rows), "bytes_down": sum(r["bytes_down"] for r in rows),
        "eval_bytes_up": sum(r["eval_bytes_up"] for r in rows),
        "eval_bytes_down": sum(r["eval_bytes_down"] for r in rows),
        "calibration_bytes_up": sum(r.get("calibration_bytes_up") or 0 for r in rows),
        "calibration_bytes_down": sum(r.get("calibration_bytes_down") or 0 for r in rows),
        "inference_bytes_per_sample": last["bytes_up"] / last["samples"] if last else None,
        "inference_bytes_single_sample": last.get("single_sample_bytes_up"),
        "final_budget": last.get("budget"), "dtype_up": cfg.dtype_up, "dtype_down": cfg.dtype_down,
        "resolution": cfg.resolution, "batch_size": cfg.batch_size, "seed": cfg.seed,
        "cut_shape": list(geometry.cut_shape), "wire_shape": list(geometry.wire_shape),
        "wall_seconds": round(progress.wall_seconds, 3),
        "train_seconds": round(sum(r["seconds"] for r in rows), 3),
        "phases": per_phase, "config": cfg.to_dict(),
    }
