"""Split your own model in your own training loop: `splitprune.split(model, at="layer2", input_size=224, budget=8)`.

The two parts share `model`'s modules (and so its weights); the bottleneck between them starts as a pass-through,
so with every channel kept the pair computes what `model` does. Train them like any nn.Module (add
`device.budget_loss()` to steer the gate to `budget` channels); put the device part's output on a wire with
`device.compress(x)` and turn it into the server's output with `server.decompress(data)`.
"""
from __future__ import annotations

import torch
from torch import nn

from splitprune.compression.bottleneck import Decoder, GatedEncoder, encoded_shape
from splitprune.compression.budget import budget_loss, channel_mask, keep_channels, select_top_b
from splitprune.compression.codec import ChannelCodec, TensorSpec
from splitprune.errors import UserError
from splitprune.models import graph
from splitprune.proto import pb
from splitprune.wire.codec import WIRE_DTYPES

__all__ = ["DevicePart", "ServerPart", "split"]


class DevicePart(nn.Module):
    """The layers up to the cut and the gated encoder: x -> the `budget` channels the gate rates highest
    (times their mask, as the paper's encoder sends them), [N, B, H, W]."""

    def __init__(self, layers: nn.Module, encoder: GatedEncoder, budget: int, dtype: str) -> None:
        super().__init__()
        self.layers, self.encoder = layers, encoder
        self.budget, self.codec = budget, ChannelCodec(dtype)
        self.num_channels = encoder.conv.out_channels

    def channels(self) -> torch.Tensor:
        """The indices of the channels that travel now (they follow the gate while it trains)."""
        return select_top_b(channel_mask(self.encoder.gate_logits), self.budget)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(self.layers(x))
        return keep_channels(z, self.channels(), channel_mask(self.encoder.gate_logits), "paper")

    def budget_loss(self, eps: float = 1000.0, delta: float = 0.01) -> torch.Tensor:
        """The method's budget loss: pushes the gate towards `budget` open channels (add it to your loss)."""
        return budget_loss(self.encoder.gate_logits, self.budget, eps, delta)

    @torch.no_grad()
    def compress(self, x: torch.Tensor) -> bytes:
        """What travels for `x`: an EncodedTensor message (the kept channels, their indices, the dtype)."""
        kept = self(x)
        return self.codec.compress(kept, self.channels(), self.num_channels, False).SerializeToString()


class ServerPart(nn.Module):
    """The decoder and the rest of the model: the kept channels (and their indices) -> the model's output."""

    def __init__(self, decoder: Decoder, layers: nn.Module, wire_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.decoder, self.layers = decoder, layers
        self.spec = TensorSpec(*wire_shape)

    def forward(self, kept: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        n, _, h, w = kept.shape
        dense = kept.new_zeros(n, self.spec.channels, h, w).index_copy(1, channels, kept)
        return self.layers(self.decoder(dense))

    @torch.no_grad()
    def decompress(self, data: bytes) -> torch.Tensor:
        """The output for a message of DevicePart.compress (checked completely before it is used)."""
        message = pb.EncodedTensor()
        try:
            message.ParseFromString(data)
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and others on garbage
            raise UserError(f"not an EncodedTensor message: {exc}") from None
        decoded = ChannelCodec.decompress(message, self.spec)
        return self.layers(self.decoder(decoded.dense()))


def split(model: nn.Module, at: str, input_size: int | tuple[int, int] = 224, budget: int | None = None,
          in_channels: int = 3, dtype: str = "fp16") -> tuple[DevicePart, ServerPart]:
    """`model` cut after the layer `at` (a valid cut: exactly one tensor crosses; `splitprune models` lists
    them), with the paper's gated encoder and decoder at the cut, started as a pass-through. `budget`: the
    channels that travel (default all); `dtype`: their wire dtype (fp32, fp16, int8, int4)."""
    if dtype not in WIRE_DTYPES:
        raise UserError(f"dtype must be one of {', '.join(WIRE_DTYPES)}, got {dtype!r}")
    traced = graph.trace(model)
    cut = graph.find(traced, at)
    device_layers, server_layers = graph.split(traced, cut)
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    shape = _cut_shape(device_layers, in_channels, size, at)
    channels = shape[0]
    budget = channels if budget is None else budget
    if not 1 <= budget <= channels:
        raise UserError(f"budget must be 1..{channels} (the channels at {at}), got {budget}")
    encoder = GatedEncoder(channels)
    decoder = Decoder(channels, relu=graph.nonnegative(traced, cut))
    encoder.start_as_identity()
    decoder.start_as_identity()
    reference = next(model.parameters(), None)
    if reference is not None:
        encoder.to(reference.device)
        decoder.to(reference.device)
    return (DevicePart(device_layers, encoder, budget, dtype),
            ServerPart(decoder, server_layers, encoded_shape(shape, 1)))


def _cut_shape(device: nn.Module, in_channels: int, size: tuple[int, int], at: str) -> tuple[int, int, int]:
    reference = next(device.parameters(), None)
    x = torch.zeros(1, in_channels, *size, device=reference.device if reference is not None else "cpu")
    was_training = device.training
    device.eval()
    try:
        with torch.no_grad():
            out = device(x)
    except Exception as exc:  # noqa: BLE001 - any layer refusing the input
        raise UserError(f"an input of {in_channels} x {size[0]} x {size[1]} does not fit the model up to {at}: "
                        f"{exc}") from None
    finally:
        device.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        raise UserError(f"the cut at {at} is not a feature map (N, C, H, W): the bottleneck gates the channels "
                        "of a convolutional feature map")
    return int(out.shape[1]), int(out.shape[2]), int(out.shape[3])
