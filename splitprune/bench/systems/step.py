"""Step cost: samples/s of the plain (sl) and compression-aware (ca) split-training steps at the SAME uplink
dtype, and the method's own work (gate, top-B, budget loss, codec) timed by itself.

Both steps run in-process through the real codec and the serialized messages. sl sends all 512 channels,
ca B=4 sends 4, both fp16 up / fp32 down, so the step ratio isolates what the method adds or saves
(top-B also makes the codec and the server's input smaller). The method's overhead is timed directly:
per step, the device's top-B choice, keeping and scaling the channels, the budget loss with its gradient,
encoding and decoding the message. Repeats are interleaved; every figure gives the median (the headline
statistic, as in the transport suite) and the min of the per-repeat times.
"""
from __future__ import annotations

import functools
import statistics
import time
from pathlib import Path

import torch

from splitprune.bench.core.common import markdown_table, write_results
from splitprune.bench.core.profiles import Profile, profile_name
from splitprune.compression import ChannelCodec, budget_loss
from splitprune.config import make_config
from splitprune.training.link import OptimizerSettings
from splitprune.training.server_worker import LocalLink
from splitprune.training.setup import build_run

DTYPE = "fp16"
VARIANTS = {  # name -> (budget or None, budget loss)
    f"sl (all, {DTYPE})": (None, False),
    f"ca (B=4, {DTYPE})": (4, True),
}


@functools.lru_cache(maxsize=2)
def _parts(model: str, batch: int, device_name: str):
    """One model per batch size, shared by the variants (each starts its own phase: budget, optimizer)."""
    cfg = make_config({"model": model, "batch_size": batch, "dtype_up": DTYPE, "train_subset": batch * 4,
                       "test_subset": 16})
    parts = build_run(cfg)
    if device_name != "cpu":
        parts.device.half.to(device_name)
        parts.server_worker.half.to(device_name)
    return parts


def step_seconds(model: str, batch: int, budget, loss: bool, steps: int, device_name: str) -> float:
    """Mean seconds of one training step over `steps` steps (after 3 warm-up steps)."""
    parts = _parts(model, batch, device_name)
    link = LocalLink(parts.server_worker)
    parts.device.start_phase(link, 0, budget, OptimizerSettings(0.01, 0.0, 5e-4), loss)
    x, y = next(iter(parts.train_loader))
    for _ in range(3):
        parts.device.train_step(x, y, link)
    start = time.perf_counter()
    for _ in range(steps):
        parts.device.train_step(x, y, link)
    return (time.perf_counter() - start) / steps


def overhead_seconds(model: str, batch: int, budget: int, steps: int, device_name: str) -> float:
    """Mean seconds per step of the method's own work on a real cut tensor: top-B, keep + scale, budget loss
    forward and backward, encode, decode."""
    parts = _parts(model, batch, device_name)
    device = parts.device
    device.budget = budget
    x, _ = next(iter(parts.train_loader))
    with torch.no_grad():
        z = device.half(x.to(device.accelerator))
    start = time.perf_counter()
    for _ in range(steps):
        channels = device.kept_channels()
        _, message = device._encode(z, channels)
        ChannelCodec.decompress(message)
        budget_loss(device.half.gate_logits, budget, device.budget_eps, device.budget_delta).backward()
    return (time.perf_counter() - start) / steps


def run(profile: str | Profile, out: Path) -> dict:
    profile = profile_name(profile)
    model = "vgg11_bn" if profile == "paper" else "vgg11_bn_compact"
    steps, repeats = (20, 3) if profile == "quick" else (50, 5)
    device_name = "cuda" if torch.cuda.is_available() else "cpu"
    rows, results = [], []
    for batch in (16, 64):
        seconds = {name: [] for name in VARIANTS}
        overhead = []
        for _ in range(repeats):  # interleave variants so machine noise hits both alike
            for name, (budget, loss) in VARIANTS.items():
                seconds[name].append(step_seconds(model, batch, budget, loss, steps, device_name))
            overhead.append(overhead_seconds(model, batch, 4, steps, device_name))
        sl, ca = seconds.values()
        med = {"sl": statistics.median(sl), "ca": statistics.median(ca), "overhead": statistics.median(overhead)}
        low = {"sl": min(sl), "ca": min(ca), "overhead": min(overhead)}
        result = {"batch": batch, "dtype_up": DTYPE, "repeats": repeats, "steps_per_repeat": steps,
                  "sl_seconds_per_step": sl, "ca_seconds_per_step": ca, "ca_overhead_seconds_per_step": overhead,
                  "median": {**med, "ca_over_sl": med["ca"] / med["sl"], "overhead_over_ca": med["overhead"] / med["ca"]},
                  "min": {**low, "ca_over_sl": low["ca"] / low["sl"], "overhead_over_ca": low["overhead"] / low["ca"]}}
        results.append(result)
        rows.append([batch, f"{batch / med['sl']:.0f} / {batch / low['sl']:.0f}",
                     f"{batch / med['ca']:.0f} / {batch / low['ca']:.0f}",
                     f"{result['median']['ca_over_sl']:.3f}x / {result['min']['ca_over_sl']:.3f}x",
                     f"{1e3 * med['overhead']:.2f} / {1e3 * low['overhead']:.2f}",
                     f"{100 * result['median']['overhead_over_ca']:.1f}% / {100 * result['min']['overhead_over_ca']:.1f}%"])
    table = markdown_table(
        ["batch", f"sl (all, {DTYPE}) samples/s", f"ca (B=4, {DTYPE}) samples/s", "ca step time / sl step time",
         "gate + top-B + budget loss + codec, ms/step", "... share of the ca step"], rows)
    text = (f"{model} on {device_name}, uplink {DTYPE} for both, {repeats} interleaved repeats of {steps} steps; "
            "each cell: from the median / from the min of the per-repeat step times (the median is the headline).\n\n" + table)
    print(text)
    (out / "step.md").parent.mkdir(parents=True, exist_ok=True)
    (out / "step.md").write_text(text)
    write_results(out, "step", {"model": model, "device": device_name, "results": results})
    return {"table": table}
