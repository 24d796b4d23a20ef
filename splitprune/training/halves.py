"""The two halves of a split network with the compression module at the cut."""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from splitprune.compression import Decoder, GatedEncoder, encoded_shape
from splitprune.compression.rungs import PrefixDecoder, RungBatchNorm, per_budget_norms
from splitprune.compression.prior import GridPrior
from splitprune.config import RunConfig
from splitprune.errors import UserError
from splitprune.models import build_part, check_model, check_server_input, cut_nonnegative, load_part, load_weights
from splitprune.models.randomness import private_rng
from splitprune.wire.entropy import EC_LEVELS, MAX_ENTRIES


@dataclass(frozen=True)
class Geometry:
    cut_shape: tuple[int, int, int]    # (C, H, W) at the split point
    wire_shape: tuple[int, int, int]   # (C, H', W') after the encoder: what travels, per sample
    nonnegative: bool = True           # the cut tensor is never negative (the decoder ends with a ReLU)

    @property
    def channels(self) -> int:
        return self.cut_shape[0]


def ec_positions(prior: str, shape: Geometry) -> int:
    """How many positions of the cut have tables of their own under `prior` (--ec-prior): 1, or all H x W of
    the wire."""
    if prior == "channel":
        return 1
    channels, h, w = shape.wire_shape
    if channels * h * w * (EC_LEVELS + 1) > MAX_ENTRIES:
        raise UserError(f"--ec-prior position: a {channels}x{h}x{w} cut needs {channels * h * w * (EC_LEVELS + 1):,} "
                        f"table entries, more than {MAX_ENTRIES:,}; use --ec-prior channel (or a smaller cut)")
    return h * w


class DeviceHalf(nn.Module):
    """Runs on the device: backbone layers up to the cut, then the gated encoder."""

    def __init__(self, layers: nn.Module, encoder: GatedEncoder, prior: GridPrior | None = None) -> None:
        super().__init__()
        self.layers = layers
        self.encoder = encoder
        if prior is not None:  # --rate-lambda: the rate term's learned prior (a module only then: older
            self.prior = prior  # checkpoints keep their keys)

    @property
    def gate_logits(self) -> nn.Parameter:
        return self.encoder.gate_logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.layers(x))


class ServerHalf(nn.Module):
    """Runs on the server: the decoder, then the rest of the backbone and its head."""

    def __init__(self, decoder: Decoder, layers: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder
        self.layers = layers
        self._rung_norms = [m for m in layers.modules() if isinstance(m, RungBatchNorm)]

    def forward(self, z: torch.Tensor, budget: int | None = None) -> torch.Tensor:
        """`budget`: how many channels were sent (None: all); an any-budget half picks its statistics by it."""
        for norm in self._rung_norms:
            norm.budget = budget
        return self.layers(self.decoder(z, budget))


Calibration = list[tuple[nn.Module, float | None]]


def start_calibration(module: nn.Module) -> Calibration:
    """From now on every BatchNorm of `module` averages the statistics of the batches it sees, from scratch (a
    plain average, torch's momentum=None; per rung for any-budget layers), instead of its running update: the
    statistics of the weights as they are ("precise BN"). Returns what `end_calibration` restores."""
    saved: Calibration = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, m.momentum))
            m.reset_running_stats()
            m.momentum = None
        elif isinstance(m, RungBatchNorm):
            saved.append((m, None))
            m.calibrating = set()
    return saved


def end_calibration(saved: Calibration) -> None:
    for m, momentum in saved:
        if isinstance(m, RungBatchNorm):
            m.calibrating = None
        else:
            m.momentum = momentum


def side_seed(seed: int, side: str) -> int:
    """The seed of one side's random stream of initial weights: a function of (seed, side) alone, so the two
    halves never share a stream and a side builds its half without the other's."""
    digest = hashlib.sha256(f"splitprune-init/{seed}/{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def geometry(cfg: RunConfig, in_channels: int, num_classes: int = 10) -> Geometry:
    """The cut tensor's shape and what travels of it (computed without memory); UserError when impossible."""
    cut = check_model(cfg.model, cfg.split, num_classes, in_channels, cfg.input_size)
    return Geometry(cut, encoded_shape(cut, cfg.resolution), cut_nonnegative(cfg.model, cfg.split, in_channels))


def check_halves(cfg: RunConfig, in_channels: int, num_classes: int | None) -> Geometry:
    """What building the halves would refuse, found before any data is loaded: the model, its cut, the input
    size, the resolution factor, and the weights file against the model (`num_classes` None: not known yet)."""
    shape = geometry(cfg, in_channels, num_classes or 10)
    if cfg.weights_sha256 is not None and cfg.weights and num_classes is not None:
        load_weights(cfg.model, num_classes, in_channels, cfg.weights, cfg.weights_sha256)
    return shape


def passes_through(cfg: RunConfig) -> bool:
    """Whether the bottleneck starts as a pass-through: a model loaded from --weights keeps its accuracy with every
    channel kept before fine-tuning (resolution 1 only: a smaller map cannot give the cut tensor back; not for
    any-budget models, whose decoder keeps statistics per budget)."""
    return cfg.weights_sha256 is not None and cfg.resolution == 1 and cfg.method != "anybudget"


def _weights(cfg: RunConfig, num_classes: int, in_channels: int, path: str | None, initial: bool):
    if cfg.weights_sha256 is None or not initial:
        return None  # no file, or a checkpoint's weights will replace the initial ones
    if path is None:
        raise UserError("this run starts from a weights file (weights_sha256 "
                        f"{cfg.weights_sha256[:16]}...): give it with --weights FILE")
    return load_weights(cfg.model, num_classes, in_channels, str(path), cfg.weights_sha256)


@contextmanager
def _stream(cfg: RunConfig, side: str) -> Iterator[None]:
    """The side's own random stream of initial weights (the process's stream is left as it was)."""
    with private_rng(side_seed(cfg.seed, side)):
        yield


def build_device_half(cfg: RunConfig, num_classes: int, in_channels: int, weights: str | None = None,
                      initial: bool = True) -> tuple[DeviceHalf, Geometry]:
    """The device half alone: the backbone up to the cut and the gated encoder, drawn from the device's stream;
    then the backbone's tensors from `weights` (the file of cfg.weights_sha256, default cfg.weights) when the run
    starts from one. `initial` False: a checkpoint will replace the initial weights (the file is not needed)."""
    shape = geometry(cfg, in_channels, num_classes)
    loaded = _weights(cfg, num_classes, in_channels, weights or cfg.weights, initial)
    with _stream(cfg, "device"):
        layers = build_part(cfg.model, cfg.split, num_classes, in_channels, "device")
        encoder = GatedEncoder(shape.channels, cfg.resolution, cfg.bn_momentum, cfg.bn_eps, cfg.gate_init)
    if loaded is not None:
        load_part(layers, loaded)
    if passes_through(cfg):
        encoder.start_as_identity()
    positions = ec_positions(cfg.ec_prior, shape)  # checked here, before training, whatever the rate weight
    prior = GridPrior(shape.channels, positions=positions) if cfg.rate_lambda > 0 else None
    return DeviceHalf(layers, encoder, prior), shape


def build_server_half(cfg: RunConfig, num_classes: int, in_channels: int, weights: str | None = None,
                      initial: bool = True) -> tuple[ServerHalf, Geometry]:
    """The server half alone: the decoder and the rest of the backbone, drawn from the server's stream; then the
    backbone's tensors from `weights` (the file of cfg.weights_sha256) when the run starts from one."""
    shape = geometry(cfg, in_channels, num_classes)
    loaded = _weights(cfg, num_classes, in_channels, weights or cfg.weights, initial)
    channels = shape.channels
    with _stream(cfg, "server"):
        layers = build_part(cfg.model, cfg.split, num_classes, in_channels, "server")
        decoder = (PrefixDecoder(channels, cfg.resolution, relu=shape.nonnegative, per_rung=cfg.rung_decoder)
                   if cfg.method == "anybudget" else Decoder(channels, cfg.resolution, relu=shape.nonnegative))
    if loaded is not None:
        load_part(layers, loaded)
    if passes_through(cfg):
        decoder.start_as_identity()
    if cfg.method == "anybudget":
        per_budget_norms(layers, channels)
    check_server_input(layers, shape.cut_shape)
    return ServerHalf(decoder, layers), shape
