"""Models suite: where real networks can be cut, what a cut costs on the wire, and what the device part costs.

For torchvision's mobilenet_v3_small, resnet18, resnet50, efficientnet_b0, convnext_tiny and one timm model at
224 x 224 (random weights: sizes and times do not depend on them):
- every valid cut found from the graph (exactly one tensor crosses), with its tensor and fp32 bytes per sample,
  the device part's parameters and MACs;
- for the stage cuts (the top-level stages of the network), the bytes of one sample's encoded uplink message
  at a few budgets and dtypes (ChannelCodec's real messages, not arithmetic);
- for three stage cuts per model (the ones nearest a quarter, a half and three quarters of the device MACs), the
  device part (backbone layers and the encoder at budget 8, as exported) in ONNX Runtime, 1 thread, batch 1.
"""
from __future__ import annotations

import csv
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from splitprune.bench.core.common import markdown_table, write_results
from splitprune.bench.core.profiles import Profile, profile_name
from splitprune.errors import UserError

MODELS = ["torchvision:mobilenet_v3_small", "torchvision:resnet18", "torchvision:resnet50",
          "torchvision:efficientnet_b0", "torchvision:convnext_tiny", "timm:regnety_008"]
SIZE = 224
WIRE = [(None, "fp32"), (None, "fp16"), (16, "fp16"), (8, "int8"), (1, "int4")]  # (budget, dtype); None: all
LATENCY_BUDGET = 8
LATENCY_CALLS = {"quick": 20, "full": 100}


def stage_cuts(cuts: list) -> list:
    """The feature-map cuts (with a spatial map left) after a top-level module or one of its children: the
    stages and blocks of a network (layer2, layer2.1, features.6, s3.b2)."""
    return [c for c in cuts if c.feature_map and c.shape[1] > 1 and c.layer.count(".") <= 1]


def message_bytes(shape: tuple[int, int, int], budget: int | None, dtype: str) -> int:
    """Bytes of one sample's uplink EncodedTensor at `budget` channels (None: all), as ChannelCodec writes it."""
    from splitprune.compression import ChannelCodec

    c, h, w = shape
    kept = c if budget is None else min(budget, c)
    channels = None if kept == c else torch.arange(kept)
    values = torch.rand(1, kept, h, w, generator=torch.Generator().manual_seed(0))
    return len(ChannelCodec(dtype).compress(values, channels, c).SerializeToString())


def device_latency(model: str, split: str, calls: int) -> dict:
    """The exported device part at LATENCY_BUDGET: median and p90 ms per call of ONNX Runtime at 1 thread, batch 1."""
    from splitprune.config import make_config
    from splitprune.export import FoldedDeviceHalf, kept_indices, to_onnx
    from splitprune.manifest import INPUT_NAME, onnx_session
    from splitprune.training.halves import build_device_half

    cfg = make_config({"model": model, "split": split, "input_size": SIZE, "method": "ca",
                       "budget": LATENCY_BUDGET})
    half, _ = build_device_half(cfg, 10, 3)
    half.eval()
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    onnx = to_onnx(FoldedDeviceHalf(half, kept_indices(half, LATENCY_BUDGET), cfg.scaling), x)
    export_s = time.perf_counter() - started
    session = onnx_session(onnx, threads=1)
    xn = x.numpy()
    for _ in range(5):
        session.run(None, {INPUT_NAME: xn})
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        session.run(None, {INPUT_NAME: xn})
        samples.append((time.perf_counter() - t0) * 1e3)
    return {"split": split, "budget": LATENCY_BUDGET, "calls": calls, "median_ms": statistics.median(samples),
            "p90_ms": float(np.percentile(samples, 90)), "onnx_bytes": len(onnx), "export_seconds": export_s}


def measure_model(model: str, calls: int) -> dict:
    from splitprune.models import list_cuts

    cuts = list_cuts(model, 10, 3, SIZE)
    total_macs = max(c.device_macs or 0 for c in cuts)
    stages = stage_cuts(cuts)
    rows = []
    for c in cuts:
        row = {"name": c.name, "shape": list(c.shape) if c.shape else None, "fp32_bytes": c.fp32_bytes,
               "device_params": c.device_params, "server_params": c.server_params, "device_macs": c.device_macs,
               "feature_map": c.feature_map, "stage": c in stages}
        if c in stages:
            row["message_bytes"] = {f"{'all' if b is None else b} {d}": message_bytes(c.shape, b, d) for b, d in WIRE}
        rows.append(row)
    picks = []
    for share in (0.25, 0.5, 0.75):
        best = min(stages, key=lambda c: abs((c.device_macs or 0) - share * total_macs))
        if best not in picks:
            picks.append(best)
    latency = []
    for c in picks:
        latency.append({**device_latency(model, c.name, calls), "device_macs": c.device_macs,
                        "share_of_macs": (c.device_macs or 0) / total_macs if total_macs else None})
    return {"model": model, "input_size": SIZE, "valid_cuts": len(cuts),
            "feature_map_cuts": sum(c.feature_map for c in cuts), "total_params": cuts[0].device_params +
            cuts[0].server_params, "total_macs": total_macs, "cuts": rows, "latency": latency}


PARTS = ("cuts", "bring")


def run(profile: str | Profile, out: Path, part: str | None = None) -> dict:
    """`splitprune bench models [--part cuts|bring]`: the cuts of real networks, then bring-a-trained-model."""
    if part is not None and part not in PARTS:
        raise UserError(f"--part: one of {', '.join(PARTS)}, not {part!r}")
    text = ""
    if part in (None, "cuts"):
        text += run_cuts(profile, out)
    if part in (None, "bring"):
        text += run_bring(profile, out / "bring")
    return {"table": text}


def run_bring(profile: str | Profile, out: Path) -> str:
    from splitprune.bench.models import bring

    results = bring.run("smoke" if isinstance(profile, Profile) and profile.smoke else "full", out)
    write_results(out, "bring", results)
    table = bring.report(results)
    (out / "bring.md").write_text(table)
    print(table)
    return table


def run_cuts(profile: str | Profile, out: Path) -> str:
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    calls = LATENCY_CALLS["quick" if profile_name(profile) == "quick" else "full"]
    results: dict = {"profile": profile_name(profile), "size": SIZE, "models": [],
                     "load_average_before": os.getloadavg()}
    for model in MODELS:
        print(f"[models] {model}", flush=True)
        results["models"].append(measure_model(model, calls))
        write_results(out, "models", results)  # what is measured so far survives a later failure
    results["load_average_after"] = os.getloadavg()
    write_results(out, "models", results)
    write_csv(out / "cuts.csv", results)
    plot(results, out / "cuts.png")
    table = report(results)
    (out / "models.md").write_text(table)
    print(table)
    return table


def write_csv(path: Path, results: dict) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model", "cut", "shape", "fp32_bytes", "device_params", "device_macs", "feature_map"])
        for m in results["models"]:
            for c in m["cuts"]:
                writer.writerow([m["model"], c["name"], "x".join(map(str, c["shape"] or [])), c["fp32_bytes"],
                                 c["device_params"], c["device_macs"], c["feature_map"]])


def plot(results: dict, path: Path) -> None:
    from splitprune.bench.core.plots import figure, save

    fig, (ax,) = figure(width=7.5, height=4.5)
    for m in results["models"]:
        points = [(c["device_macs"] / 1e6, c["fp32_bytes"]) for c in m["cuts"]
                  if c["feature_map"] and c["shape"][1] > 1]
        ax.plot(*zip(*points), marker=".", label=m["model"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("device part, MMACs per image (224 x 224)")
    ax.set_ylabel("cut tensor, fp32 bytes per image")
    ax.set_title("Every valid feature-map cut: device work vs what an uncompressed cut sends", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, path)


def report(r: dict) -> str:
    wire = [f"{'all' if b is None else 'B=' + str(b)} {d}" for b, d in WIRE]
    text = markdown_table(["model", "valid cuts", "feature-map cuts", "params", "MACs"], [
        [m["model"], m["valid_cuts"], m["feature_map_cuts"], f"{m['total_params'] / 1e6:.2f}M",
         f"{m['total_macs'] / 1e9:.2f}G"] for m in r["models"]])
    for m in r["models"]:
        rows = [[c["name"], " x ".join(map(str, c["shape"])), f"{c['device_macs'] / 1e6:.1f}",
                 *[f"{c['message_bytes'][k]:,}" for k in c["message_bytes"]]]
                for c in m["cuts"] if c["stage"]]
        text += f"\n**{m['model']}** — stage cuts, bytes of one image's uplink message:\n\n"
        text += markdown_table(["cut", "tensor", "device MMACs", *wire], rows)
    rows = [[m["model"], t["split"], f"{t['device_macs'] / 1e6:.1f}", f"{t['median_ms']:.2f}", f"{t['p90_ms']:.2f}"]
            for m in r["models"] for t in m["latency"]]
    text += (f"\nDevice part (backbone to the cut + encoder at B={LATENCY_BUDGET}, as `splitprune export` folds it) "
             "in ONNX Runtime, 1 thread, batch 1:\n\n")
    text += markdown_table(["model", "cut", "device MMACs", "median ms", "p90 ms"], rows)
    text += (f"\nLoad average {r['load_average_before'][0]:.2f} before, {r.get('load_average_after', [0])[0]:.2f} "
             "after (2 cores; other jobs on the machine are named in BENCHMARKS.md).\n")
    return text
