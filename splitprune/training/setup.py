"""Assemble a run's parts from its config: data, both halves, the workers and the in-process server."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from splitprune.compression import ChannelCodec
from splitprune.config import RunConfig
from splitprune.data import DATASETS, BatchLoader, make_loaders
from splitprune.errors import UserError
from splitprune.training.checkpoint import (load_module, load_optimizer, module_tensors, optimizer_tensors,
                                            read_meta, read_tensors)
from splitprune.training.halves import Geometry, build_halves
from splitprune.training.step import DeviceWorker, Link, LocalLink, ServerWorker


class ServerEndpoint(Protocol):
    """Where the server half runs, as the trainer sees it: a link plus access to the server's state."""

    link: Link

    def server_state(self) -> dict[str, torch.Tensor]: ...

    def load_server_state(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def close(self) -> None: ...


class InProcessServer:
    """The server half in this process, reached through LocalLink (serialized messages all the same)."""

    def __init__(self, worker: ServerWorker) -> None:
        self.worker = worker
        self.link = LocalLink(worker)

    def server_state(self) -> dict[str, torch.Tensor]:
        tensors = module_tensors("server", self.worker.half)
        if self.worker.optimizer is not None:
            tensors.update(optimizer_tensors("opt.server", self.worker.optimizer, self.worker.half))
        tensors["rng.server"] = self.worker.rng.state.clone()
        return tensors

    def load_server_state(self, tensors: dict[str, torch.Tensor]) -> None:
        load_module("server", self.worker.half, tensors)
        if self.worker.optimizer is not None:
            load_optimizer("opt.server", self.worker.optimizer, self.worker.half, tensors)
        if "rng.server" in tensors:
            self.worker.rng.state = tensors["rng.server"].clone()

    def close(self) -> None:
        pass


@dataclass
class RunParts:
    cfg: RunConfig
    device: DeviceWorker
    server_worker: ServerWorker        # this process's copy; the remote one when training over a network
    geometry: Geometry
    num_classes: int
    in_channels: int
    train_loader: BatchLoader
    test_loader: BatchLoader


def input_channels(cfg: RunConfig) -> int:
    if cfg.dataset not in DATASETS:
        raise UserError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}")
    return cfg.in_channels or DATASETS[cfg.dataset].in_channels


def build_workers(cfg: RunConfig, num_classes: int, in_channels: int) -> tuple[DeviceWorker, ServerWorker, Geometry]:
    device_half, server_half, geometry = build_halves(cfg, num_classes, in_channels)
    device = DeviceWorker(device_half, geometry, num_classes, ChannelCodec(cfg.dtype_up), cfg.scaling,
                          cfg.budget_eps, cfg.budget_delta, cfg.seed)
    server = ServerWorker(server_half, geometry, num_classes, ChannelCodec(cfg.dtype_down), cfg.seed,
                          max_batch=max(cfg.batch_size, cfg.test_batch_size))
    return device, server, geometry


def build_run(cfg: RunConfig) -> RunParts:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    in_channels = input_channels(cfg)
    train, test, num_classes = make_loaders(cfg.dataset, cfg.data_dir, cfg.batch_size, cfg.input_size, in_channels,
                                            cfg.seed, cfg.train_subset, cfg.test_subset, cfg.augment,
                                            cfg.test_batch_size, cfg.validation_size)
    device, server, geometry = build_workers(cfg, num_classes, in_channels)
    if cfg.from_checkpoint:
        load_pretrained(cfg, device, server, num_classes)
    if cfg.accelerator == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--accelerator cuda: no CUDA device is available here")
        device.half.cuda()
        server.half.cuda()
    return RunParts(cfg, device, server, geometry, num_classes, in_channels, train, test)


def read_pretrained(cfg: RunConfig, num_classes: int | None = None) -> dict[str, torch.Tensor]:
    """The weights of cfg.from_checkpoint, refused unless model, split, resolution and classes match."""
    meta = read_meta(cfg.from_checkpoint)
    trained = meta.get("config", {})
    for key in ("model", "split", "resolution", "input_size"):
        if trained.get(key) != getattr(cfg, key):
            raise UserError(f"checkpoint {cfg.from_checkpoint} was trained with {key}={trained.get(key)!r}, "
                            f"this run asks for {getattr(cfg, key)!r}")
    if num_classes is not None and meta.get("num_classes") != num_classes:
        raise UserError(f"checkpoint has {meta.get('num_classes')} classes, the dataset {num_classes}")
    return read_tensors(meta["_folder"])


def load_pretrained(cfg: RunConfig, device: DeviceWorker, server: ServerWorker, num_classes: int) -> None:
    """Start from a trained model (prune)."""
    tensors = read_pretrained(cfg, num_classes)
    load_module("device", device.half, tensors)
    load_module("server", server.half, tensors)
