"""The torch-free core of the wire codec: numpy arrays <-> EncodedTensor / Labels messages.

Both the training runtime (`splitprune.compression.codec`, which wraps it for torch tensors) and the
device package `splitprune-device` (ONNX Runtime, no PyTorch) encode with these functions, so the
uplink messages of both are the same bytes for the same values. Imports only numpy and protobuf.
"""
from __future__ import annotations

import numpy as np

from splitprune.errors import ProtocolError
from splitprune.proto import pb
from splitprune.wire.entropy import EC_DTYPES, encode_symbols, levels_of, quantize_ec, tables_digest

WIRE_DTYPES: dict[str, int] = {"fp32": pb.FP32, "fp16": pb.FP16, "int8": pb.INT8, "int4": pb.INT4,
                               **{name: pb.EC for name in EC_DTYPES}}
NUMPY_DTYPES = {pb.FP32: np.dtype("<f4"), pb.FP16: np.dtype("<f2"), pb.INT8: np.dtype("u1"), pb.INT4: np.dtype("u1")}
# EC (entropy-coded) has no fixed width: splitprune/wire/entropy.py
LEVELS = {pb.INT8: 255, pb.INT4: 15}  # affine quantisation: q in 0..levels
MAX_CHANNELS = 65535  # channel indices travel as uint16
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def dtype_name(dtype: int) -> str:
    for name, value in WIRE_DTYPES.items():
        if value == dtype:
            return name
    raise ProtocolError(f"unknown tensor dtype {dtype}")


def check_dtype_name(name: str) -> int:
    if name not in WIRE_DTYPES:
        raise ProtocolError(f"unknown wire dtype {name!r}; choose one of {', '.join(WIRE_DTYPES)}")
    return WIRE_DTYPES[name]


def quantize(values: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine per channel (axis 1) over all samples and positions of that channel: q in 0..levels."""
    per_channel = values.transpose(1, 0, 2, 3).reshape(values.shape[1], -1)
    lo = per_channel.min(axis=1) if per_channel.size else np.zeros(values.shape[1], np.float32)
    hi = per_channel.max(axis=1) if per_channel.size else lo
    scale = ((hi - lo) / levels).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).reshape(1, -1, 1, 1)
    q = np.rint((values - lo.reshape(1, -1, 1, 1)) / safe)
    return np.clip(q, 0, levels).astype(np.uint8), scale, lo.astype(np.float32)


def pack_nibbles(q: np.ndarray) -> bytes:
    flat = q.reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_nibbles(data: bytes, count: int) -> np.ndarray:
    packed = np.frombuffer(data, dtype=np.uint8)
    return np.stack([packed & 0x0F, packed >> 4], axis=1).reshape(-1)[:count]


def encode_values(values: np.ndarray, channels: np.ndarray | None, num_channels: int, dtype: int,
                  prefix: bool = False, tables: np.ndarray | None = None) -> pb.EncodedTensor:
    """values: float32 [N, K, H, W] of the kept channels `channels` (ascending; None = all C channels).

    With `prefix` the kept channels are the first K (`channels`, if given, must be 0..K-1): the message
    says so with its `prefix` field instead of listing them (any-budget models); all C channels travel
    with neither, as always. EC needs the frozen `tables` [C, L+1] of the model, and values in [0, 1]."""
    if values.ndim != 4:
        raise ProtocolError(f"cut tensors are 4-D [N, C, H, W], got shape {tuple(values.shape)}")
    values = np.ascontiguousarray(values, dtype=np.float32)
    if not np.isfinite(values).all():
        raise ProtocolError("refusing to encode non-finite values (NaN or Inf): the training has diverged")
    n, k, h, w = values.shape
    msg = pb.EncodedTensor(dtype=dtype, shape=[n, num_channels, h, w])
    if prefix:
        if channels is not None and not np.array_equal(np.asarray(channels), np.arange(k)):
            raise ProtocolError(f"a prefix message carries channels 0..{k - 1}, not {np.asarray(channels).tolist()}")
        if not 1 <= k <= num_channels:
            raise ProtocolError(f"a prefix of {k} channels out of {num_channels}")
        if k != num_channels:
            msg.prefix = k
    elif channels is not None and k != num_channels:
        msg.channels = np.asarray(channels).astype("<u2").tobytes()
    elif k != num_channels:
        raise ProtocolError(f"{k} of {num_channels} channels given without their indices")
    if dtype == pb.EC:
        if tables is None:
            raise ProtocolError("dtype ec needs the model's entropy tables (a checkpoint trained with them)")
        if values.size and (values.min() < -1e-6 or values.max() > 1 + 1e-6):
            raise ProtocolError("dtype ec codes values in [0, 1] (a gated bottleneck's output), got "
                                f"{float(values.min()):g}..{float(values.max()):g}")
        rows = np.arange(k) if channels is None else np.asarray(channels)
        msg.data = encode_symbols(quantize_ec(values, levels_of(tables)), tables, rows)
        msg.tables = tables_digest(tables)
    elif dtype in LEVELS:
        q, scale, offset = quantize(values, LEVELS[dtype])
        msg.data = pack_nibbles(q) if dtype == pb.INT4 else q.tobytes()
        msg.scales, msg.offsets = scale.astype("<f4").tobytes(), offset.astype("<f4").tobytes()
    else:
        msg.data = values.astype(NUMPY_DTYPES[dtype]).tobytes()
    return msg


def kept_count(msg: pb.EncodedTensor) -> int:
    """How many channels an EncodedTensor says it carries, read from its header before any validation."""
    if msg.prefix:
        return int(msg.prefix)
    if msg.channels:
        return len(msg.channels) // 2
    return int(msg.shape[1]) if len(msg.shape) == 4 else 0


def decode_channels(msg: pb.EncodedTensor, num_channels: int) -> tuple[np.ndarray, bool]:
    """The kept channel indices (int64, ascending) of a message with C = `num_channels`, validated, and
    whether they were sent as a prefix."""
    if msg.prefix:
        if msg.channels:
            raise ProtocolError("a tensor message gives both a channel prefix and channel indices")
        if msg.prefix > num_channels:
            raise ProtocolError(f"channel prefix {msg.prefix} exceeds the {num_channels} channels")
        return np.arange(msg.prefix, dtype=np.int64), True
    if not msg.channels:
        return np.arange(num_channels, dtype=np.int64), False
    if len(msg.channels) % 2:
        raise ProtocolError("channel indices must be uint16: odd byte count")
    idx = np.frombuffer(msg.channels, dtype="<u2").astype(np.int64)
    if idx.size and (idx[-1] >= num_channels or (np.diff(idx) <= 0).any()):
        raise ProtocolError(f"channel indices must be strictly ascending and below {num_channels}")
    return idx, False


def encode_label_array(labels: np.ndarray) -> pb.Labels:
    width = 1 if labels.size == 0 or int(labels.max()) < 256 else 2
    return pb.Labels(width=width, data=labels.astype("u1" if width == 1 else "<u2").tobytes())


def decode_label_array(msg: pb.Labels, count: int, num_classes: int) -> np.ndarray:
    """Validated class ids (int64) of a Labels message that must hold `count` of them."""
    if msg.width not in (1, 2):
        raise ProtocolError(f"label width must be 1 or 2 bytes, got {msg.width}")
    if len(msg.data) != count * msg.width:
        raise ProtocolError(f"expected {count} labels of {msg.width} byte(s), got {len(msg.data)} bytes")
    y = np.frombuffer(msg.data, dtype="u1" if msg.width == 1 else "<u2").astype(np.int64)
    if y.size and int(y.max()) >= num_classes:
        raise ProtocolError(f"label {int(y.max())} out of range for {num_classes} classes")
    return y
