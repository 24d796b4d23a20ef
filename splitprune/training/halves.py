"""The two halves of a split network with the compression module at the cut."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from splitprune.compression import Decoder, GatedEncoder, encoded_shape
from splitprune.compression.bottleneck import PrefixDecoder, RungBatchNorm, per_budget_norms
from splitprune.config import RunConfig
from splitprune.models import build_split_model, check_server_input


@dataclass(frozen=True)
class Geometry:
    cut_shape: tuple[int, int, int]    # (C, H, W) at the split point
    wire_shape: tuple[int, int, int]   # (C, H', W') after the encoder: what travels, per sample

    @property
    def channels(self) -> int:
        return self.cut_shape[0]


class DeviceHalf(nn.Module):
    """Runs on the device: backbone layers up to the cut, then the gated encoder."""

    def __init__(self, layers: nn.Module, encoder: GatedEncoder) -> None:
        super().__init__()
        self.layers = layers
        self.encoder = encoder

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


def build_halves(cfg: RunConfig, num_classes: int, in_channels: int) -> tuple[DeviceHalf, ServerHalf, Geometry]:
    """Build both halves with weights drawn from cfg.seed; refuses impossible shapes with a UserError.

    Both halves are always drawn, in one seeded stream: the encoder's initial weights come after the
    server layers' in it, so a side that needs only one half builds both and drops the other.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        split = build_split_model(cfg.model, cfg.split, num_classes, in_channels, cfg.input_size)
        channels = split.cut_shape[0]
        wire = encoded_shape(split.cut_shape, cfg.resolution)
        encoder = GatedEncoder(channels, cfg.resolution, cfg.bn_momentum, cfg.bn_eps, cfg.gate_init)
        decoder = (PrefixDecoder if cfg.method == "anybudget" else Decoder)(channels, cfg.resolution)
    if cfg.method == "anybudget":
        per_budget_norms(split.server, channels)
    check_server_input(split.server, split.cut_shape)
    return DeviceHalf(split.device, encoder), ServerHalf(decoder, split.server), Geometry(split.cut_shape, wire)
