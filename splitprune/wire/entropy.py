"""The torch-free core of the entropy-coded uplink (dtype EC): integer symbols <-> one range-coded string.

The encoder's outputs lie in [0, 1] (a sigmoid times a sigmoid gate), so a fixed grid quantises them
with no per-batch side information: q = round(L y), q in 0..L, decoded as q / L, where L + 1 is the width
of the tables (a model keeps tables for L = 3, 7 and 15: dtypes ec3, ec7, ec). Each channel has its
own frozen table of integer frequencies, [C, L+1], or one per channel and position of the cut, [C, H*W, L+1]
(`--ec-prior position`: a cut whose spatial layout is fixed, such as a centred object's, codes in fewer bytes),
fitted on the training set at the end of training and shipped in the checkpoint and in the exported manifest
(integer tables, so every platform builds the same coder). A batch is one string: the kept channels in
order, each channel's N x H x W symbols under its table(s), range-coded with `constriction` (Rust wheels,
numpy API, no torch), in 32-bit words.

Imports only numpy, hashlib and constriction (loaded on first use).
"""
from __future__ import annotations

import hashlib

import numpy as np

from splitprune.errors import ProtocolError

EC_LEVELS = 15               # q in 0..15: the int4 alphabet (dtype ec)
EC_DTYPES = {"ec": 15, "ec7": 7, "ec3": 3}  # dtype name -> grid levels L (all travel as DType EC)
MAX_FREQUENCY = 1 << 24      # per entry of a table
MAX_ENTRIES = 1 << 18        # entries of one grid's tables: C x (L+1), or C x H*W x (L+1) per position


def fit_tables(counts: np.ndarray) -> np.ndarray:
    """Frozen integer tables (uint32) from symbol counts, [C, L+1] or [C, P, L+1]: counts + 1, so that every
    symbol stays codable, scaled down when a row would exceed MAX_FREQUENCY."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim not in (2, 3) or counts.shape[-1] < 2 or (counts < 0).any():
        raise ValueError(f"symbol counts must be [C, L+1] or [C, P, L+1] and >= 0, got shape {counts.shape}")
    rows = counts.sum(axis=-1, keepdims=True)
    scale = np.where(rows > MAX_FREQUENCY // 2, (MAX_FREQUENCY // 2) / np.maximum(rows, 1), 1.0)
    return (np.floor(counts * scale) + 1).astype(np.uint32)


def check_tables(tables: np.ndarray, channels: int) -> np.ndarray:
    tables = np.asarray(tables)
    if (tables.ndim not in (2, 3) or tables.shape[0] != channels or not 2 <= tables.shape[-1] <= 256
            or 0 in tables.shape or tables.size > MAX_ENTRIES):
        raise ValueError(f"entropy tables must be [{channels}, L+1] or [{channels}, positions, L+1] with "
                         f"1 <= L <= 255 and at most {MAX_ENTRIES} entries, got {list(tables.shape)}")
    if tables.dtype.kind not in "iu" or (tables < 1).any() or (tables > MAX_FREQUENCY).any():
        raise ValueError(f"entropy table entries must be integers in 1..{MAX_FREQUENCY}")
    return tables.astype(np.uint32)


def tables_digest(tables: np.ndarray) -> int:
    """32 bits of SHA-256 over the tables (shape and little-endian uint32 entries): the message carries it,
    so that a device and a server with different tables refuse each other instead of decoding noise."""
    t = np.ascontiguousarray(tables, dtype="<u4")
    h = hashlib.sha256(np.asarray(t.shape, dtype="<u4").tobytes() + t.tobytes()).digest()
    return int.from_bytes(h[:4], "little")


def levels_of(tables: np.ndarray) -> int:
    return int(tables.shape[-1]) - 1


def quantize_ec(values: np.ndarray, levels: int) -> np.ndarray:
    return np.clip(np.rint(values * levels), 0, levels).astype(np.int32)


def _coders(tables: np.ndarray, rows: np.ndarray, count: int):
    """Per kept channel, the arguments after the symbols of constriction's encode/decode for `count` symbols
    (N x H x W, positions last): its one model, or the model family and each symbol's row (a position prior)."""
    import constriction

    family = constriction.stream.model.Categorical(perfect=False)
    for r in rows:  # one channel's rows at a time: N*H*W x (L+1) floats under a position prior
        if tables.ndim == 2:
            yield (constriction.stream.model.Categorical(tables[r].astype(np.float64), perfect=False),)
        else:
            yield family, np.tile(tables[r].astype(np.float64), (count // tables.shape[1], 1))


def _check_positions(tables: np.ndarray, h: int, w: int) -> None:
    if tables.ndim == 3 and tables.shape[1] != h * w:
        raise ProtocolError(f"the entropy tables are per position of a {tables.shape[1]}-position cut, the tensor "
                            f"has {h}x{w}")


def encode_symbols(q: np.ndarray, tables: np.ndarray, channels: np.ndarray) -> bytes:
    """q: int [N, K, H, W] in 0..L for the kept channels `channels` (their rows of `tables`); one string."""
    import constriction

    n, _, h, w = q.shape
    _check_positions(tables, h, w)
    encoder = constriction.stream.queue.RangeEncoder()
    for j, coder in enumerate(_coders(tables, channels, n * h * w)):
        encoder.encode(np.ascontiguousarray(q[:, j].reshape(-1), dtype=np.int32), *coder)
    return encoder.get_compressed().astype("<u4").tobytes()


def decode_symbols(data: bytes, shape: tuple[int, int, int, int], tables: np.ndarray,
                   channels: np.ndarray) -> np.ndarray:
    """The symbols [N, K, H, W] of one string, or ProtocolError for a string that is not what the shape and
    tables announce (truncated, corrupted, trailing words)."""
    import constriction

    if len(data) % 4:
        raise ProtocolError(f"an entropy-coded string is whole 32-bit words, got {len(data)} bytes")
    n, k, h, w = shape
    _check_positions(tables, h, w)
    words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
    try:
        decoder = constriction.stream.queue.RangeDecoder(words)
        out = np.empty((k, n * h * w), dtype=np.int32)
        for j, coder in enumerate(_coders(tables, channels, n * h * w)):
            out[j] = decoder.decode(coder[0], n * h * w) if len(coder) == 1 else decoder.decode(*coder)
    except Exception as exc:  # noqa: BLE001 - the coder's own error for a corrupted string
        raise ProtocolError(f"entropy-coded string does not decode: {exc}") from None
    q = out.reshape(k, n, h, w).transpose(1, 0, 2, 3)
    # canonical: only the string the encoder makes for these symbols is accepted (a range decoder reads
    # past a truncated end and ignores trailing words; re-encoding costs about what decoding did)
    if encode_symbols(q, tables, channels) != data:
        raise ProtocolError("entropy-coded string is not the encoding of the symbols it decodes to (truncated, "
                            "corrupted or followed by extra words)")
    return q
