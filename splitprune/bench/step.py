"""Step cost: samples/s of the plain (sl) and compression-aware (ca) split-training steps, side by side.

Both run the same in-process step through the real codec; the question is what top-B, the budget
loss and the gate cost on top of a plain step (the reference code's per-channel loop cost ~6x).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from splitprune.bench.common import markdown_table, write_results
from splitprune.config import make_config
from splitprune.training.setup import build_run
from splitprune.training.step import LocalLink, OptimizerSettings

VARIANTS = {  # name -> (budget or None, dtype up, budget loss)
    "sl (all, fp32)": (None, "fp32", False),
    "ca (B=4, fp16)": (4, "fp16", True),
}


def _worker(model: str, batch: int, dtype: str, device_name: str):
    cfg = make_config({"model": model, "batch_size": batch, "dtype_up": dtype, "train_subset": batch * 4,
                       "test_subset": 16})
    parts = build_run(cfg)
    if device_name != "cpu":
        parts.device.half.to(device_name)
        parts.server_worker.half.to(device_name)
    return parts


def time_steps(model: str, batch: int, budget, dtype: str, budget_loss: bool, steps: int, device_name: str) -> float:
    parts = _worker(model, batch, dtype, device_name)
    link = LocalLink(parts.server_worker)
    parts.device.start_phase(link, 0, budget, OptimizerSettings(0.01, 0.0, 5e-4), budget_loss)
    x, y = next(iter(parts.train_loader))
    for _ in range(3):
        parts.device.train_step(x, y, link)
    start = time.perf_counter()
    for _ in range(steps):
        parts.device.train_step(x, y, link)
    return steps * batch / (time.perf_counter() - start)


def run(profile: str, out: Path) -> dict:
    model = "vgg11_bn" if profile == "paper" else "vgg11_bn_compact"
    steps, repeats = (30, 3) if profile == "quick" else (50, 5)
    device_name = "cuda" if torch.cuda.is_available() else "cpu"
    rows, results = [], []
    for batch in (16, 64):
        speeds = {name: [] for name in VARIANTS}
        for _ in range(repeats):  # interleave variants so machine noise hits both alike
            for name, (budget, dtype, loss) in VARIANTS.items():
                speeds[name].append(time_steps(model, batch, budget, dtype, loss, steps, device_name))
        sl, ca = (statistics.median(v) for v in speeds.values())
        results.append({"batch": batch, "sl_samples_per_s": sl, "ca_samples_per_s": ca, "ca_cost_vs_sl": sl / ca,
                        "raw": speeds})
        rows.append([batch, f"{sl:.0f}", f"{ca:.0f}", f"{sl / ca:.3f}x"])
    table = markdown_table(["batch", "sl samples/s", "ca samples/s", "ca step cost / sl step cost"], rows)
    print(f"model {model} on {device_name}\n{table}")
    (out / "step.md").parent.mkdir(parents=True, exist_ok=True)
    (out / "step.md").write_text(table)
    write_results(out, "step", {"model": model, "device": device_name, "results": results})
    return {"table": table}
