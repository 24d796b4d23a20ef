"""Evaluate a saved checkpoint at a chosen budget and uplink dtype, through the real codec."""
from __future__ import annotations

import torch

from splitprune.compression import ChannelCodec
from splitprune.config import make_config
from splitprune.data import make_loaders
from splitprune.training.checkpoint import load_module, read_tensors
from splitprune.training.setup import build_workers
from splitprune.training.step import LocalLink
from splitprune.training.trainer import evaluate


def evaluate_checkpoint(meta: dict, budget: int, dtype_up: str | None = None, data_dir: str | None = None,
                        test_subset: int | None = None, test_batch_size: int | None = None,
                        threads: int | None = None, progress: bool = False) -> dict:
    """Evaluate on the full test set (or `test_subset` images); the other arguments replace the trained values."""
    values = dict(meta["config"])
    changes = {"dtype_up": dtype_up, "data_dir": data_dir, "test_batch_size": test_batch_size, "threads": threads}
    values.update({k: v for k, v in changes.items() if v is not None})
    values["test_subset"] = test_subset
    cfg = make_config(values)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _, test, num_classes = make_loaders(cfg.dataset, cfg.data_dir, cfg.batch_size, cfg.input_size,
                                        meta["in_channels"], cfg.seed, 1, cfg.test_subset, False, cfg.test_batch_size)
    device, server, geometry = build_workers(cfg, meta["num_classes"], meta["in_channels"])
    tensors = read_tensors(meta["_folder"])
    load_module("device", device.half, tensors)
    load_module("server", server.half, tensors)
    device.codec = ChannelCodec(cfg.dtype_up)
    result = evaluate(device, LocalLink(server), test, budget, progress=progress)
    return {"checkpoint": meta["_folder"], "budget": budget, "channels": geometry.channels,
            "dtype_up": cfg.dtype_up, "test_accuracy": result.accuracy, "test_samples": result.samples,
            "batch_size": cfg.test_batch_size, "bytes_per_sample": result.bytes_up / max(result.samples, 1),
            "single_sample_bytes": result.single_sample_bytes_up, "eval_bytes_down": result.bytes_down}
