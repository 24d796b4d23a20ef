"""Wire codec for cut tensors: only the kept channels travel, as fp32, fp16, int8 or int4 values.

Like CompressAI's latent codecs, one object per codec with the verbs of the hot path: `compress` (tensor ->
the EncodedTensor message a request or reply carries) and `decompress` (message -> tensor, every field
checked first). Byte counts are those of the serialized messages the runtime sends, in-process or not.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from splitprune.errors import ProtocolError
from splitprune.proto import pb
from splitprune.wire.codec import (LEVELS, MAX_CHANNELS, MAX_MESSAGE_BYTES, NUMPY_DTYPES, WIRE_DTYPES, check_dtype_name,
                                   decode_channels, decode_label_array, encode_label_array, encode_values,
                                   unpack_nibbles)
from splitprune.wire.entropy import EC_DTYPES, decode_symbols, levels_of, tables_digest

# WIRE_DTYPES and MAX_MESSAGE_BYTES are imported from here by the runtime; their home is
# splitprune.wire.codec, the torch-free core shared with the device package.


@dataclass(frozen=True)
class TensorSpec:
    """What a receiver accepts: the dense cut shape (C, H, W), the largest batch, the allowed dtypes."""

    channels: int
    height: int
    width: int
    max_batch: int = 4096
    dtypes: tuple[int, ...] = tuple(WIRE_DTYPES.values())
    max_kept: int | None = None  # largest K accepted (the budget); None = C
    tables: object = field(default=None, compare=False)  # the model's entropy tables: one [C, L+1] array, or a
    # dict of them (by grid L): EC messages coded with any of them are accepted


@dataclass
class Decoded:
    """A received tensor: values of the kept channels [N, K, H, W] (float32) and their indices [K];
    `prefix`: they came as a prefix (channels 0..K-1 named by their count)."""

    values: torch.Tensor
    channels: torch.Tensor
    num_channels: int
    prefix: bool = False

    def to(self, device: torch.device) -> "Decoded":
        return Decoded(self.values.to(device), self.channels.to(device), self.num_channels, self.prefix)

    def dense(self) -> torch.Tensor:
        """Scatter the kept channels into a zero tensor [N, C, H, W]."""
        n, _, h, w = self.values.shape
        out = self.values.new_zeros(n, self.num_channels, h, w)
        return out.index_copy_(1, self.channels, self.values)


class ChannelCodec:
    """Encodes the kept channels of a cut tensor with one wire dtype ("fp32", "fp16", "int8", "int4", or "ec" with
    the model's frozen entropy `tables`).

    `compress` makes the EncodedTensor message that requests and replies carry (the device's activations, the
    server's gradients); `decompress` checks a received one completely against a TensorSpec and gives its values.
    Both are what every step calls, in-process and over the network alike."""

    def __init__(self, dtype: str = "fp16", tables: np.ndarray | dict | None = None) -> None:
        """`tables`: the model's entropy tables, one array or a dict by grid L (the dtype's is used)."""
        self.dtype_name = dtype
        self.dtype = check_dtype_name(dtype)
        if isinstance(tables, dict):
            tables = tables.get(EC_DTYPES[dtype]) if dtype in EC_DTYPES else None
        if dtype in EC_DTYPES and tables is not None and levels_of(tables) != EC_DTYPES[dtype]:
            raise ProtocolError(f"dtype {dtype} codes on {EC_DTYPES[dtype] + 1} levels, the tables have "
                                f"{levels_of(tables) + 1}")
        self.tables = tables

    def __repr__(self) -> str:
        return f"ChannelCodec({self.dtype_name!r})"

    def compress(self, kept: torch.Tensor, channels: torch.Tensor | None, num_channels: int,
                 prefix: bool = False) -> pb.EncodedTensor:
        """kept: [N, K, H, W] values of the channels `channels` (ascending; None = all C channels);
        `prefix`: they are channels 0..K-1, sent as a prefix length (see splitprune.wire.codec.encode_values)."""
        values = kept.detach().to(torch.float32).cpu().contiguous().numpy()
        indices = None if channels is None else channels.detach().cpu().numpy()
        return encode_values(values, indices, num_channels, self.dtype, prefix, self.tables)

    @staticmethod
    def decompress(msg: pb.EncodedTensor, spec: TensorSpec | None = None) -> Decoded:
        """A received message, validated completely (against `spec` when given), as float32 values; whatever
        dtype it was sent in (the spec says which ones are allowed)."""
        return decode_tensor(msg, spec)


def _check_shape(msg: pb.EncodedTensor, spec: TensorSpec | None) -> tuple[int, int, int, int]:
    if len(msg.shape) != 4:
        raise ProtocolError(f"tensor shape must have 4 dims [N, C, H, W], got {list(msg.shape)}")
    n, c, h, w = (int(v) for v in msg.shape)
    if min(n, c, h, w) < 1 or c > MAX_CHANNELS:
        raise ProtocolError(f"invalid tensor shape {[n, c, h, w]}")
    if n * c * h * w * 4 > 4 * MAX_MESSAGE_BYTES:
        raise ProtocolError(f"tensor shape {[n, c, h, w]} is too large")
    if spec is not None:
        if (c, h, w) != (spec.channels, spec.height, spec.width):
            raise ProtocolError(f"tensor shape {[c, h, w]} does not match the session's cut shape "
                                f"{[spec.channels, spec.height, spec.width]}")
        if n > spec.max_batch:
            raise ProtocolError(f"batch of {n} exceeds the limit of {spec.max_batch}")
        if msg.dtype not in spec.dtypes:
            raise ProtocolError(f"dtype {msg.dtype} not allowed here; expected one of {list(spec.dtypes)}")
    return n, c, h, w


def decode_tensor(msg: pb.EncodedTensor, spec: TensorSpec | None = None) -> Decoded:
    """Validate a tensor message completely and return its values as float32."""
    if msg.dtype not in NUMPY_DTYPES and msg.dtype != pb.EC:
        raise ProtocolError(f"unknown tensor dtype {msg.dtype}")
    n, c, h, w = _check_shape(msg, spec)
    idx, prefix = decode_channels(msg, c)
    k = idx.size
    if spec is not None and spec.max_kept is not None and k > spec.max_kept:
        raise ProtocolError(f"{k} channels sent but the budget is {spec.max_kept}")
    if msg.dtype == pb.EC:
        return _decode_ec(msg, spec, (n, k, h, w), idx, c, prefix)
    np_dtype = NUMPY_DTYPES[msg.dtype]
    count = n * k * h * w
    expected = (count + 1) // 2 if msg.dtype == pb.INT4 else count * np_dtype.itemsize
    if len(msg.data) != expected:
        raise ProtocolError(f"tensor data holds {len(msg.data)} bytes, shape and dtype need {expected}")
    raw = unpack_nibbles(msg.data, count) if msg.dtype == pb.INT4 else np.frombuffer(msg.data, dtype=np_dtype)
    values = raw.reshape(n, k, h, w).astype(np.float32)
    if msg.dtype in LEVELS:
        if len(msg.scales) != 4 * k or len(msg.offsets) != 4 * k:
            raise ProtocolError(f"quantised tensors need {k} float32 scales and offsets")
        scale = np.frombuffer(msg.scales, dtype="<f4").reshape(1, k, 1, 1)
        offset = np.frombuffer(msg.offsets, dtype="<f4").reshape(1, k, 1, 1)
        if not (np.isfinite(scale).all() and np.isfinite(offset).all()):
            raise ProtocolError("int8 scales or offsets are not finite")
        values = values * scale + offset
    elif not np.isfinite(values).all():
        raise ProtocolError("tensor holds non-finite values (NaN or Inf)")
    return Decoded(torch.from_numpy(values), torch.from_numpy(idx), c, prefix)


def accepted_tables(spec: TensorSpec | None) -> dict[int, np.ndarray]:
    """The entropy tables a receiver accepts, by digest."""
    tables = spec.tables if spec is not None else None
    if tables is None:
        return {}
    return {tables_digest(t): t for t in (tables.values() if isinstance(tables, dict) else [tables])}


def _decode_ec(msg: pb.EncodedTensor, spec: TensorSpec | None, shape: tuple[int, int, int, int], idx: np.ndarray,
               c: int, prefix: bool) -> Decoded:
    accepted = accepted_tables(spec)
    if not accepted:
        raise ProtocolError("an entropy-coded tensor, but this model has no entropy tables")
    tables = accepted.get(msg.tables)
    if tables is None:
        raise ProtocolError(f"the tensor was coded with other entropy tables (digest {msg.tables:08x}, not one of "
                            "this model's)")
    if msg.scales or msg.offsets:
        raise ProtocolError("an entropy-coded tensor carries no scales or offsets")
    q = decode_symbols(msg.data, shape, tables, idx)
    values = q.astype(np.float32) / levels_of(tables)
    return Decoded(torch.from_numpy(values), torch.from_numpy(idx), c, prefix)


def encode_labels(labels: torch.Tensor) -> pb.Labels:
    return encode_label_array(labels.detach().cpu().numpy())


def decode_labels(msg: pb.Labels, count: int, num_classes: int) -> torch.Tensor:
    return torch.from_numpy(decode_label_array(msg, count, num_classes))
