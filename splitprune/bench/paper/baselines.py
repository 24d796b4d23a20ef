"""Simple baselines for the rate-accuracy suite, each measured with real encoded bytes.

A baseline run is built from a typed choice of parts (`Baseline`), never by patching the worker:
- selector FixedRandomChannels(B): B channels drawn at random once (seeded) instead of the gate's top-B;
  no budget loss. Trained like any run (here: fine-tuned from the sl model with the prune recipe).
- bottleneck NarrowBottleneck(W): a narrow learned bottleneck without a gate: encoder Conv(C->W) + BN +
  sigmoid on the device, decoder ConvTranspose(W->C) + BN + ReLU on the server, all W channels sent
  through the normal codec.
- top-k (TopKCodec): of the sl model's wire tensor, per sample the k values furthest from a reference
  mean (known to both sides), sent as uint16 flat indices + fp16 values; the receiver fills the rest
  with the reference. Evaluation only (no training).
- int8 of the full tensor is the sl model evaluated with the int8 codec (see the rate suite).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

from splitprune.compression.bottleneck import FixedRandomChannels, NarrowBottleneck
from splitprune.compression.codec import TensorSpec
from splitprune.config import RunConfig, resolve_schedule
from splitprune.errors import ProtocolError, UserError
from splitprune.training.device_worker import DeviceWorker
from splitprune.training.halves import Geometry
from splitprune.training.server_worker import ServerWorker


@dataclass(frozen=True)
class Baseline:
    """A run's parts other than the method's: a channel selector and/or a bottleneck (None = the method's)."""

    selector: FixedRandomChannels | None = None
    bottleneck: NarrowBottleneck | None = None


def install(baseline: Baseline, cfg: RunConfig, device: DeviceWorker, server: ServerWorker,
            budget: int | None) -> Geometry:
    """Give freshly built workers the baseline's parts (before any weights are loaded); returns the geometry.

    budget: the one budget a fixed-channel baseline sends (its training phase's, or a checkpoint's)."""
    geometry = device.geometry
    if baseline.selector is not None:
        if budget != baseline.selector.count:
            raise UserError(f"a {baseline.selector.count}-channel baseline trains and runs at budget "
                            f"{baseline.selector.count}, not {budget}")
        device.selector = baseline.selector.build(device.channels, cfg.seed)
    if baseline.bottleneck is not None:
        c, _, _ = geometry.cut_shape
        _, h, w = geometry.wire_shape
        encoder, decoder = baseline.bottleneck.build(c, cfg.resolution, cfg.bn_momentum, cfg.bn_eps, cfg.seed)
        device.half.encoder = encoder.to(next(device.half.layers.parameters()).device)
        server.half.decoder = decoder.to(server.accelerator)
        width = baseline.bottleneck.width
        geometry = Geometry((width, h, w), (width, h, w))
        device.geometry = geometry
        server.spec = TensorSpec(width, h, w, max_batch=server.spec.max_batch)
    return geometry


def build_parts(cfg: RunConfig, baseline: Baseline):
    """RunParts for a baseline run, starting from cfg.from_checkpoint if given."""
    from splitprune.training.setup import build_run

    parts = build_run(cfg)
    budgets = {p.budget for p in resolve_schedule(cfg, parts.geometry.channels)}
    if baseline.selector is not None and len(budgets) != 1:
        raise UserError("a fixed-channel baseline trains at one budget")
    parts.geometry = install(baseline, cfg, parts.device, parts.server_worker, next(iter(budgets)))
    return parts


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
