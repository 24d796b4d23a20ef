"""Simple baselines for the rate-accuracy suite, each measured with real encoded bytes.

- random_channels: a fixed set of B channels drawn at random once (seeded), used instead of the gate's
  top-B; no budget loss. Trained like any run (here: fine-tuned from the sl model with the prune recipe).
- bottleneck: a narrow learned bottleneck without a gate: encoder Conv(C->W) + BN + sigmoid on the device,
  decoder ConvTranspose(W->C) + BN + ReLU on the server, all W channels sent through the normal codec.
- top-k (TopKCodec): of the sl model's wire tensor, per sample the k values furthest from a reference
  mean (known to both sides), sent as uint16 flat indices + fp16 values; the receiver fills the rest
  with the reference. Evaluation only (no training).
- int8 of the full tensor is the sl model evaluated with the int8 codec (see the rate suite).
"""
from __future__ import annotations

import struct

import numpy as np
import torch
from torch import nn

from splitprune.compression.bottleneck import Decoder, _geometry
from splitprune.compression.codec import TensorSpec
from splitprune.config import RunConfig
from splitprune.errors import ProtocolError, UserError
from splitprune.training.halves import Geometry
from splitprune.training.step import DeviceWorker, ServerWorker

RANDOM_SEED_OFFSET = 4242
BOTTLENECK_SEED_OFFSET = 99


# ---------------------------------------------------------------------------------------------- random channels
def random_channels(channels: int, budget: int, seed: int) -> torch.Tensor:
    """B channel indices (ascending), drawn once from (seed, channels, budget)."""
    gen = torch.Generator().manual_seed(seed + RANDOM_SEED_OFFSET)
    return torch.randperm(channels, generator=gen)[:budget].sort().values


class FixedChannelsDevice(DeviceWorker):
    """A DeviceWorker that always sends the same fixed channels: no top-B by the gate, no budget loss."""

    fixed: torch.Tensor

    @classmethod
    def wrap(cls, worker: DeviceWorker, fixed: torch.Tensor) -> "FixedChannelsDevice":
        obj = cls.__new__(cls)
        obj.__dict__.update(worker.__dict__)
        obj.fixed = fixed.to(worker.accelerator)
        return obj

    def kept_channels(self, budget: int | None = None) -> torch.Tensor | None:
        budget = self.budget if budget is None else budget
        if budget is None or budget >= self.channels:
            return None
        if budget != self.fixed.numel():
            raise UserError(f"this random-channel model sends its {self.fixed.numel()} fixed channels, not {budget}")
        return self.fixed

    def start_phase(self, link, phase, budget, optimizer, use_budget_loss) -> None:
        super().start_phase(link, phase, budget, optimizer, use_budget_loss=False)


# ---------------------------------------------------------------------------------------------- narrow bottleneck
class NarrowEncoder(nn.Module):
    """Conv(C->W, the gated encoder's geometry) -> BN -> sigmoid. Its `gate_logits` are fixed (never trained):
    the DeviceWorker asks for them, and with scaling "binary" they play no part."""

    def __init__(self, channels: int, width: int, resolution: int = 1, bn_momentum: float = 0.03,
                 bn_eps: float = 1e-4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, width, **_geometry(resolution))
        self.bn = nn.BatchNorm2d(width, momentum=bn_momentum, eps=bn_eps)
        self.gate_logits = nn.Parameter(torch.full((1, width, 1, 1), 15.0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.bn(self.conv(x)))


def make_bottleneck(device: DeviceWorker, server: ServerWorker, cfg: RunConfig) -> Geometry:
    """Replace the gated encoder/decoder of both workers by a fresh narrow pair; returns the new geometry."""
    width = int(cfg.extra["width"])
    c, _, _ = device.geometry.cut_shape
    _, h, w = device.geometry.wire_shape
    accelerator = next(device.half.layers.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + BOTTLENECK_SEED_OFFSET)
        encoder = NarrowEncoder(c, width, cfg.resolution, cfg.bn_momentum, cfg.bn_eps)
        decoder = Decoder(c, cfg.resolution, in_channels=width)
    device.half.encoder = encoder.to(accelerator)
    server.half.decoder = decoder.to(server.accelerator)
    geometry = Geometry((width, h, w), (width, h, w))
    device.geometry = geometry
    server.spec = TensorSpec(width, h, w, max_batch=server.spec.max_batch)
    return geometry


# ---------------------------------------------------------------------------------------------- building
def build_parts(cfg: RunConfig):
    """RunParts for a baseline run (cfg.extra["baseline"]), starting from cfg.from_checkpoint if given."""
    from splitprune.training.setup import build_run

    kind = cfg.extra.get("baseline")
    parts = build_run(cfg)
    if kind == "random_channels":
        budgets = {p.budget for p in _phases(cfg, parts.geometry.channels)}
        if len(budgets) != 1 or None in budgets:
            raise UserError("a random-channel baseline trains at one budget below the channel count")
        parts.device = FixedChannelsDevice.wrap(parts.device, random_channels(parts.geometry.channels,
                                                                              budgets.pop(), cfg.seed))
    elif kind == "bottleneck":
        parts.geometry = make_bottleneck(parts.device, parts.server_worker, cfg)
    else:
        raise UserError(f"unknown baseline {kind!r}")
    return parts


def _phases(cfg: RunConfig, channels: int):
    from splitprune.config import resolve_schedule
    return resolve_schedule(cfg, channels)


def adapt_loaded(cfg: RunConfig, device: DeviceWorker, server: ServerWorker, budget: int) -> DeviceWorker:
    """For evaluation: give freshly built workers a baseline's shape before its weights are loaded."""
    kind = cfg.extra.get("baseline")
    if kind == "bottleneck":
        make_bottleneck(device, server, cfg)
    elif kind == "random_channels":
        device = FixedChannelsDevice.wrap(device, random_channels(device.channels, budget, cfg.seed))
    elif kind is not None:
        raise UserError(f"unknown baseline {kind!r}")
    return device


# ---------------------------------------------------------------------------------------------- top-k
_HEADER = struct.Struct("<III")  # samples, k, values per sample


class TopKCodec:
    """Per sample, the k entries of the wire tensor furthest from `reference` (uint16 index + fp16 value)."""

    def __init__(self, k: int, reference: torch.Tensor) -> None:
        self.reference = reference.detach().to(torch.float32).cpu()
        self.size = self.reference.numel()
        if self.size > 65536:
            raise UserError(f"top-k indices travel as uint16: a tensor of {self.size} values is too large")
        if not 1 <= k <= self.size:
            raise UserError(f"k must be in 1..{self.size}, got {k}")
        self.k = k

    def compress(self, wire: torch.Tensor) -> bytes:
        flat = wire.detach().to(torch.float32).cpu().flatten(1)
        if flat.shape[1] != self.size:
            raise ProtocolError(f"expected {self.size} values per sample, got {flat.shape[1]}")
        distance = (flat - self.reference.flatten()).abs()
        idx = distance.topk(self.k, dim=1).indices.sort(dim=1).values
        values = flat.gather(1, idx)
        return (_HEADER.pack(flat.shape[0], self.k, self.size) + idx.numpy().astype("<u2").tobytes()
                + values.numpy().astype("<f2").tobytes())

    def decompress(self, data: bytes) -> torch.Tensor:
        if len(data) < _HEADER.size:
            raise ProtocolError("top-k message too short")
        n, k, size = _HEADER.unpack_from(data)
        if size != self.size or len(data) != _HEADER.size + 4 * n * k:
            raise ProtocolError("top-k message does not match its header")
        body = memoryview(data)[_HEADER.size:]
        idx = np.frombuffer(body[:2 * n * k], dtype="<u2").astype(np.int64).reshape(n, k)
        values = np.frombuffer(body[2 * n * k:], dtype="<f2").astype(np.float32).reshape(n, k)
        out = self.reference.flatten().repeat(n, 1)
        out.scatter_(1, torch.from_numpy(idx), torch.from_numpy(values))
        return out.view(n, *self.reference.shape)
