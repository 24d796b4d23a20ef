"""Assemble a run's parts from its config: data, the device side, and (in-process only) the server side.

A remote run's device process builds only the device worker; the server half is built where it runs
(the in-process server here, or `splitprune serve`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from splitprune.compression import ChannelCodec
from splitprune.compression.tables import read_tables
from splitprune.wire.entropy import EC_DTYPES
from splitprune.compression.bottleneck import PrefixChannels
from splitprune.config import RunConfig, stored_config
from splitprune.data import DATASETS, BatchLoader, calibration_batches, make_loaders
from splitprune.errors import UserError
from splitprune.models import head_note, load_weights, model_in_channels
from splitprune.training.checkpoint import load_module, read_meta, read_tensors
from splitprune.training.device_worker import DeviceWorker
from splitprune.training.halves import (DeviceHalf, Geometry, ServerHalf, build_device_half, build_server_half,
                                        check_halves, passes_through)
from splitprune.training.link import Link
from splitprune.training.objectives import NestedPrefixes
from splitprune.training.reorder import DECODER_IN, gated_to_anybudget, with_rung_decoder
from splitprune.training.server_worker import LocalLink, ServerWorker


@dataclass
class HalfSnapshot:
    """What a device checkpoint keeps of the server half at a step.

    `tensors`: its weights ("server.*") and training state ("opt.server.*", "rng.server") when the half
    lives in this process; empty when it lives on a server, which saves it there. `identity`: how to find
    that server-side checkpoint again (server, step id, version, state digest); None in-process.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    identity: dict | None = None


class Endpoint(Protocol):
    """Where the server half runs, as the trainer sees it: a link, checkpoints of the half, and closing."""

    link: Link

    def checkpoint(self, step_id: int, keep: bool = False) -> HalfSnapshot: ...

    def restore(self, record: HalfSnapshot, step_id: int) -> None: ...

    def close(self) -> None: ...


class LocalEndpoint:
    """The server half in this process, reached through LocalLink (serialized messages all the same)."""

    def __init__(self, worker: ServerWorker) -> None:
        self.worker = worker
        self.link = LocalLink(worker)

    def checkpoint(self, step_id: int, keep: bool = False) -> HalfSnapshot:
        return HalfSnapshot(self.worker.state_tensors())

    def restore(self, record: HalfSnapshot, step_id: int) -> None:
        if not any(k.startswith("server.") for k in record.tensors):
            where = (record.identity or {}).get("server", "a server")
            raise UserError(f"this run's server half was trained on {where} and is not in its checkpoint: resume "
                            "it with --server, or fetch the whole model first with `splitprune pull`")
        self.worker.load_state(record.tensors)

    def close(self) -> None:
        pass


@dataclass
class RunParts:
    cfg: RunConfig
    device: DeviceWorker
    server_worker: ServerWorker | None  # None when the server half runs elsewhere (a remote run)
    geometry: Geometry
    num_classes: int
    in_channels: int
    train_loader: BatchLoader
    test_loader: BatchLoader
    calibration: list[torch.Tensor] = field(default_factory=list)  # precise BN's batches (cfg.bn_calibration)
    notes: list[str] = field(default_factory=list)  # what the user is told once (a replaced head, ...)


def input_channels(cfg: RunConfig) -> int:
    """--in-channels, else the channels the model requires (torchvision's 3), else the dataset's."""
    if cfg.dataset not in DATASETS:
        raise UserError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}")
    return cfg.in_channels or model_in_channels(cfg.model) or DATASETS[cfg.dataset].in_channels


def _device_worker(cfg: RunConfig, half: DeviceHalf, geometry: Geometry, num_classes: int,
                   tables: dict[int, np.ndarray] | None = None) -> DeviceWorker:
    selector = PrefixChannels() if cfg.method == "anybudget" else None
    return DeviceWorker(half, geometry, num_classes, ChannelCodec(cfg.dtype_up, tables), cfg.scaling, cfg.budget_eps,
                        cfg.budget_delta, cfg.seed, selector, cfg.rate_lambda, cfg.train_grid)


def _server_worker(cfg: RunConfig, half: ServerHalf, geometry: Geometry, num_classes: int,
                   tables: dict[int, np.ndarray] | None = None) -> ServerWorker:
    objective = NestedPrefixes(cfg.nested) if cfg.method == "anybudget" else None
    return ServerWorker(half, geometry, num_classes, ChannelCodec(cfg.dtype_down), cfg.seed,
                        max_batch=max(cfg.batch_size, cfg.test_batch_size), objective=objective,
                        steps=cfg.server_steps_value(), tables=tables)


def build_device_worker(cfg: RunConfig, num_classes: int, in_channels: int, initial: bool = True,
                        tables: dict[int, np.ndarray] | None = None) -> tuple[DeviceWorker, Geometry]:
    """The device side alone (a remote run, a device): the server half is never built. `initial` False: a
    checkpoint's weights replace the initial ones (a --weights file is not needed). `tables`: the model's
    frozen entropy tables (dtype ec)."""
    device_half, geometry = build_device_half(cfg, num_classes, in_channels, initial=initial)
    return _device_worker(cfg, device_half, geometry, num_classes, tables), geometry


def build_server_worker(cfg: RunConfig, num_classes: int, in_channels: int, weights: str | None = None,
                        initial: bool = True, tables: dict[int, np.ndarray] | None = None) -> tuple[ServerWorker, Geometry]:
    """The server side alone (what `splitprune serve` hosts): the device half is never built. `weights`: the
    file of cfg.weights_sha256 (default cfg.weights); `initial` and `tables` as build_device_worker (with
    tables, the server accepts entropy-coded activations)."""
    server_half, geometry = build_server_half(cfg, num_classes, in_channels, weights, initial)
    return _server_worker(cfg, server_half, geometry, num_classes, tables), geometry


def build_workers(cfg: RunConfig, num_classes: int, in_channels: int,
                  tables: dict[int, np.ndarray] | None = None) -> tuple[DeviceWorker, ServerWorker, Geometry]:
    """Both sides in one process (in-process runs, evaluation, benchmarks): each half the same as built alone."""
    device, geometry = build_device_worker(cfg, num_classes, in_channels, tables=tables)
    return device, build_server_worker(cfg, num_classes, in_channels, tables=tables)[0], geometry


@dataclass
class Loaded:
    """A trained checkpoint loaded into the workers of the sides a command needs (the others None)."""

    cfg: RunConfig
    meta: dict
    tensors: dict[str, torch.Tensor]
    device: DeviceWorker | None
    server: ServerWorker | None


def load_checkpoint(checkpoint: str | Path, sides: tuple[str, ...] = ("device", "server"),
                    **changes) -> Loaded:
    """The one loader of a trained model: its checkpoint (or run folder) read, its config as trained with
    `changes` on top (e.g. data_dir, dtype_up, test_subset; None values ignored), and its weights put into the
    workers of `sides` only, in eval mode. A half that the checkpoint lacks (a remote run's server half) is a
    UserError naming how to get it."""
    meta = read_meta(checkpoint)
    if "config" not in meta or "num_classes" not in meta:
        raise UserError(f"{checkpoint} is not a model checkpoint of `splitprune train`")
    if "server" in sides and meta.get("server_half"):
        raise UserError(f"{checkpoint} holds the device half of a remote run only: fetch the whole model with "
                        f"`splitprune pull --server HOST:PORT --checkpoint {checkpoint} --out DIR` first")
    cfg = stored_config({**meta["config"], **{k: v for k, v in changes.items() if v is not None}})
    shape = meta.get("wire_shape") or meta.get("cut_shape")
    tables = read_tables(meta, int(shape[0])) if shape else None
    if cfg.dtype_up in EC_DTYPES and EC_DTYPES[cfg.dtype_up] not in (tables or {}):
        raise UserError(f"{checkpoint} holds no entropy tables for {cfg.dtype_up} (trained before they were kept): "
                        f"--dtype-up {cfg.dtype_up} "
                        "needs a model trained with this version, or another --dtype-up")
    tensors = read_tensors(meta["_folder"])
    device = server = None
    if "device" in sides:
        device, _ = build_device_worker(cfg, meta["num_classes"], meta["in_channels"], initial=False, tables=tables)
        load_module("device", device.half, tensors)
        device.half.eval()
    if "server" in sides:
        server, _ = build_server_worker(cfg, meta["num_classes"], meta["in_channels"], initial=False, tables=tables)
        load_module("server", server.half, tensors)
        server.half.eval()
    return Loaded(cfg, meta, tensors, device, server)


def build_run(cfg: RunConfig, server: bool = True) -> RunParts:
    """Data and the device side; with `server`, the in-process server side too (False: it runs remotely)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    in_channels = input_channels(cfg)
    check_halves(cfg, in_channels, DATASETS[cfg.dataset].num_classes)
    train, test, num_classes = make_loaders(cfg.dataset, cfg.data_dir, cfg.batch_size, cfg.input_size, in_channels,
                                            cfg.seed, cfg.train_subset, cfg.test_subset, cfg.augment,
                                            cfg.test_batch_size, cfg.validation_size, cfg.normalisation())
    if server:
        device, worker, geometry = build_workers(cfg, num_classes, in_channels)
    else:
        (device, geometry), worker = build_device_worker(cfg, num_classes, in_channels), None
    if cfg.from_checkpoint:
        load_pretrained(cfg, device, worker, num_classes)
    if cfg.accelerator == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--accelerator cuda: no CUDA device is available here")
        device.half.cuda()
        if worker is not None:
            worker.half.cuda()
    calibration = calibration_batches(train, cfg.bn_calibration, cfg.test_batch_size) if cfg.bn_calibration else []
    return RunParts(cfg, device, worker, geometry, num_classes, in_channels, train, test, calibration,
                    run_notes(cfg, num_classes, in_channels))


def run_notes(cfg: RunConfig, num_classes: int, in_channels: int) -> list[str]:
    """What a run says once when it starts: a model's head replaced for the data's classes, how the bottleneck
    starts when the model comes from a weights file."""
    notes = [head_note(cfg.model, num_classes, in_channels)]
    if cfg.weights_sha256 is not None and cfg.weights:
        notes.append(load_weights(cfg.model, num_classes, in_channels, cfg.weights, cfg.weights_sha256).note)
        notes.append("the bottleneck starts as a pass-through (every channel kept, the loaded model's accuracy "
                     "unchanged)" if passes_through(cfg) else
                     "the bottleneck starts from random weights (a pass-through start needs resolution 1 and a "
                     "method other than anybudget)")
    return [n for n in notes if n]


def read_pretrained(cfg: RunConfig, num_classes: int | None = None) -> dict[str, torch.Tensor]:
    """The weights of cfg.from_checkpoint, refused unless model, split, resolution and classes match.

    An any-budget run gets them with the cut's channels in the source gate's order (gated_to_anybudget), so that
    its prefixes start from the channels the gate rated best (unless the source is an any-budget model
    itself); the model computes the same function."""
    meta = read_meta(cfg.from_checkpoint)
    trained = meta.get("config", {})
    for key in ("model", "split", "resolution", "input_size"):
        if trained.get(key) != getattr(cfg, key):
            raise UserError(f"checkpoint {cfg.from_checkpoint} was trained with {key}={trained.get(key)!r}, "
                            f"this run asks for {getattr(cfg, key)!r}")
    if num_classes is not None and meta.get("num_classes") != num_classes:
        raise UserError(f"checkpoint has {meta.get('num_classes')} classes, the dataset {num_classes}")
    gated = trained.get("method") != "anybudget"  # an any-budget source is in prefix order already
    if not gated and cfg.method != "anybudget":
        raise UserError(f"checkpoint {cfg.from_checkpoint} is an any-budget model: it serves every budget already "
                        f"(splitprune eval/infer --budget B); --method {cfg.method} starts from a gated "
                        "model (sl, ca, deprune, prune)")
    tensors = read_tensors(meta["_folder"])
    tensors = gated_to_anybudget(tensors) if cfg.method == "anybudget" and gated else tensors
    shared = DECODER_IN[0] in tensors
    if cfg.rung_decoder and shared:
        return with_rung_decoder(tensors)
    if not cfg.rung_decoder and not shared and f"{DECODER_IN[0]}.0" in tensors:
        raise UserError(f"checkpoint {cfg.from_checkpoint} has a decoder per budget rung (--rung-decoder): "
                        "continue it with --rung-decoder")
    return tensors


def load_pretrained(cfg: RunConfig, device: DeviceWorker, server: ServerWorker | None, num_classes: int) -> None:
    """Start from a trained model (prune, anybudget); a remote run's server half travels to the server instead."""
    tensors = read_pretrained(cfg, num_classes)
    load_module("device", device.half, tensors)
    if server is not None:
        load_module("server", server.half, tensors)
