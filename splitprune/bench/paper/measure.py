"""Rate-accuracy measurements of trained models: one device pass per batch, many (budget, dtype) points.

For each point the device encodes the kept channels with the real codec, builds the real EvalRequest
message and sends it through the in-process link (serialized bytes both ways), exactly as
`DeviceWorker.predict` / `splitprune eval` do; only the device forward is shared between the points.
Bytes per sample are message bytes at the evaluation batch size; the single-sample request size is
measured too.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splitprune.bench.paper.baselines import Baseline, TopKCodec, install
from splitprune.compression import ChannelCodec, channel_mask, decode_labels, keep_channels
from splitprune.compression.tables import read_tables
from splitprune.wire.entropy import EC_DTYPES
from splitprune.config import stored_config
from splitprune.proto import pb
from splitprune.training.checkpoint import load_module, read_meta, read_tensors
from splitprune.training.device_worker import DeviceWorker
from splitprune.training.halves import ec_positions
from splitprune.training.link import parse_message
from splitprune.training.server_worker import LocalLink, ServerWorker
from splitprune.training.setup import build_workers


@dataclass
class LoadedModel:
    meta: dict
    cfg: object
    device: DeviceWorker
    server: ServerWorker
    budget: int           # the budget it was trained for (channels = all)

    @property
    def channels(self) -> int:
        return self.device.channels


def load_model(folder, accelerator: str = "cpu", baseline: Baseline | None = None) -> LoadedModel:
    """A checkpoint (a run's, a prune phase's models/budget_B, or a baseline's, given its parts) ready to evaluate."""
    meta = read_meta(folder)
    cfg = stored_config({**meta["config"], "accelerator": accelerator})  # from_checkpoint is never loaded here
    shape = meta.get("wire_shape") or meta["cut_shape"]
    tables = read_tables(meta, int(shape[0])) or {}  # by grid; completed by complete_tables when needed
    device, server, _ = build_workers(cfg, meta["num_classes"], meta["in_channels"], tables)
    if baseline is not None:
        install(baseline, cfg, device, server, int(meta["budget"]))
    tensors = read_tensors(meta["_folder"])
    load_module("device", device.half, tensors)
    load_module("server", server.half, tensors)
    if accelerator != "cpu":
        device.half.to(accelerator)
        server.half.to(accelerator)
    return LoadedModel(meta, cfg, device, server, int(meta["budget"]))


def count_tables(model: LoadedModel, levels: tuple[int, ...], positions: int) -> dict[int, np.ndarray]:
    """Entropy tables per grid L counted on the run's training set, as the trainer counts them at its end."""
    from splitprune.compression.tables import count_symbols
    from splitprune.data import make_loaders
    from splitprune.training.setup import input_channels
    from splitprune.wire.entropy import fit_tables

    cfg = model.cfg
    train, _, _ = make_loaders(cfg.dataset, cfg.data_dir, cfg.batch_size, cfg.input_size, input_channels(cfg),
                               cfg.seed, cfg.train_subset, cfg.test_subset, cfg.augment, cfg.test_batch_size,
                               cfg.validation_size, cfg.normalisation())
    counts = count_symbols((model.device.cut_values(x) for x, _ in train), model.channels, levels, positions)
    return {L: fit_tables(c) for L, c in counts.items()}


def complete_tables(model: LoadedModel) -> list[int]:
    """Entropy tables for every grid: the ones a checkpoint lacks (trained before it kept them) are counted here
    (count_tables). The grids added."""
    from splitprune.compression.tables import LEVELS

    tables = model.server.spec.tables
    missing = tuple(L for L in LEVELS if L not in tables)
    if missing:
        tables.update(count_tables(model, missing, ec_positions(model.cfg.ec_prior, model.device.geometry)))
    return list(missing)


def with_all_tables(checkpoint: str, out: Path) -> str:
    """`checkpoint` itself when it holds tables for every grid, else a copy in `out` with the missing ones
    counted (complete_tables) and sealed into its metadata: what a server can host with --model."""
    from splitprune.compression.tables import LEVELS, META_KEY, table_entry
    from splitprune.training.checkpoint import SEAL_KEY, STATE_FILE, write_checkpoint

    meta = read_meta(checkpoint)
    model = load_model(checkpoint)
    if not complete_tables(model):
        return checkpoint
    kept = {k: v for k, v in meta.items() if not k.startswith("_") and k not in (SEAL_KEY, "format", "layout")}
    kept[META_KEY] = [table_entry(model.server.spec.tables[L]) for L in LEVELS]
    state_path = Path(meta["_folder"]) / STATE_FILE
    write_checkpoint(out, read_tensors(meta["_folder"]), kept,
                     read_tensors(meta["_folder"], STATE_FILE) if state_path.exists() else None)
    return str(out)


@dataclass(frozen=True)
class Point:
    budget: int | None = None     # None = all channels
    dtype: str = "fp32"
    topk: TopKCodec | None = None

    def key(self) -> str:
        if self.topk is not None:
            return f"top{self.topk.k}-fp16"
        return f"B{'all' if self.budget is None else self.budget}-{self.dtype}"


@torch.no_grad()
def evaluate_points(model: LoadedModel, loader, points: list[Point]) -> list[dict]:
    device, server = model.device, model.server
    link = LocalLink(server)
    device.half.eval()
    server.half.eval()
    codecs = {d: ChannelCodec(d) for d in ("fp32", "fp16", "int8", "int4")}
    for name, levels in EC_DTYPES.items():  # the model's frozen entropy tables, per grid
        if levels in (server.spec.tables or {}):
            codecs[name] = ChannelCodec(name, server.spec.tables)
    saved_codec = device.codec
    correct = [0] * len(points)
    up = [0] * len(points)
    down = [0] * len(points)
    samples = 0
    single: list[int] = [0] * len(points)

    def one(point: Point, z: torch.Tensor, n: int) -> tuple[torch.Tensor, int, int]:
        if point.topk is not None:
            wire = keep_channels(z, None, channel_mask(device.half.gate_logits), device.scaling)
            data = point.topk.compress(wire)
            restored = point.topk.decompress(data).to(server.accelerator)
            server.half.eval()
            return server.half(restored).argmax(1).cpu(), len(data), 0
        device.codec = codecs[point.dtype]
        device.step_id += 1
        _, activations = device._encode(z, device.kept_channels(point.budget))
        request = pb.EvalRequest(request_id=device.step_id, activations=activations).SerializeToString()
        reply_bytes = link.evaluate(request)
        reply = parse_message(pb.EvalReply, reply_bytes)
        return decode_labels(reply.predictions, n, device.num_classes), len(request), len(reply_bytes)

    try:
        first = True
        for x, y in loader:
            z = device.half(x.to(device.accelerator))
            for i, point in enumerate(points):
                predictions, sent, received = one(point, z, len(y))
                correct[i] += int((predictions == y).sum())
                up[i] += sent
                down[i] += received
            samples += len(y)
            if first:
                z1 = device.half(x[:1].to(device.accelerator))
                single = [one(point, z1, 1)[1] for point in points]
                first = False
    finally:
        device.codec = saved_codec
    return [{"point": p.key(), "budget": "all" if p.budget is None and p.topk is None else p.budget,
             "dtype": "fp16" if p.topk is not None else p.dtype, "topk": p.topk.k if p.topk else None,
             "accuracy": correct[i] / max(samples, 1), "samples": samples,
             "bytes_per_sample": up[i] / max(samples, 1), "single_sample_bytes": single[i],
             "eval_bytes_down": down[i], "batch_size": loader.batch_size}
            for i, p in enumerate(points)]


@torch.no_grad()
def wire_reference(model: LoadedModel, loader, max_samples: int = 1024) -> torch.Tensor:
    """Mean wire tensor [C, H, W] of a model over some training images: the top-k baseline's reference."""
    device = model.device
    device.half.eval()
    total, count = None, 0
    mask = channel_mask(device.half.gate_logits)
    for x, _ in loader:
        wire = keep_channels(device.half(x.to(device.accelerator)), None, mask, device.scaling).cpu()
        total = wire.sum(0) if total is None else total + wire.sum(0)
        count += len(x)
        if count >= max_samples:
            break
    return total / count
