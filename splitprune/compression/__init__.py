"""Compression at the cut: the gated encoder/decoder, the channel budget, and the wire codec."""
from splitprune.compression.bottleneck import Decoder, GatedEncoder, encoded_shape
from splitprune.compression.budget import budget_loss, channel_mask, keep_channels, reset_gate, select_top_b, soft_count
from splitprune.compression.codec import WIRE_DTYPES, ChannelCodec, Decoded, TensorSpec, decode_labels, encode_labels

__all__ = [
    "GatedEncoder", "Decoder", "encoded_shape", "budget_loss", "channel_mask", "keep_channels", "reset_gate",
    "select_top_b", "soft_count", "WIRE_DTYPES", "ChannelCodec", "Decoded", "TensorSpec", "decode_labels",
    "encode_labels",
]
