"""Model inputs without torch: IDX files, and uint8 images -> the normalised float32 input of the device half.

Torch-free (numpy only), so the device package `splitprune-device` ships it; `splitprune.data` reads its
datasets with the same IDX reader and pads / converts images with the same constants.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from splitprune.errors import UserError

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
PAD_LIMIT = 8  # images up to this many pixels smaller than the model input are centre-padded with zeros
GZIP_MAGIC = b"\x1f\x8b"
IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_file_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == GZIP_MAGIC else raw
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"cannot read IDX file {path}: {exc}") from exc


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes into an array, checking the magic number and that the size matches the header."""
    if len(data) < 4 or data[:2] != b"\x00\x00":
        raise UserError(f"{source} is not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    type_code, ndim = data[2], data[3]
    if type_code not in IDX_DTYPES or ndim == 0:
        raise UserError(f"{source} is not a supported IDX file (type 0x{type_code:02x}, {ndim} dimensions)")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise UserError(f"{source} is truncated: header needs {header_size} bytes, file has {len(data)}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[type_code]
    expected = header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise UserError(f"{source} has {len(data)} bytes but its header {shape} needs {expected}: truncated or corrupt")
    return np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    path = Path(path)
    return parse_idx(read_file_bytes(path), str(path))


def pad_box(height: int, width: int, size: int) -> tuple[int, int] | None:
    """(top, left) zero padding that centres a height x width image in size x size, or None when the image
    is larger or more than PAD_LIMIT pixels smaller (it needs a resize instead)."""
    if not (size - PAD_LIMIT <= min(height, width) and max(height, width) <= size):
        return None
    return (size - height) // 2, (size - width) // 2


def resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of a bilinear resize with antialiasing, as torch's F.interpolate(mode="bilinear",
    antialias=True, align_corners=False) computes them (a triangle filter widened by the scale when shrinking)."""
    scale = in_size / out_size
    support, invscale = (scale, 1.0 / scale) if scale >= 1.0 else (1.0, 1.0)
    weights = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
        taps = np.clip(1.0 - np.abs((np.arange(lo, hi) - center + 0.5) * invscale), 0.0, None)
        weights[i, lo:hi] = taps / taps.sum()
    return weights.astype(np.float32)


def fit_images(x: np.ndarray, size: int) -> np.ndarray:
    """float32 [N,C,H,W] -> [N,C,size,size]: centre zero-padding when at most PAD_LIMIT pixels smaller (Fashion-MNIST
    28 -> 32), otherwise a bilinear antialiased resize (what the training data went through)."""
    n, c, height, width = x.shape
    if height == width == size:
        return x
    box = pad_box(height, width, size)
    if box is not None:
        top, left = box
        padded = np.zeros((n, c, size, size), np.float32)
        padded[:, :, top:top + height, left:left + width] = x
        return padded
    rows, cols = resize_weights(height, size), resize_weights(width, size)
    return np.einsum("oh,nchw,pw->ncop", rows, x, cols, optimize=True).astype(np.float32)


def normalise_images(images: np.ndarray, size: int, in_channels: int, mean: Sequence[float],
                     std: Sequence[float]) -> np.ndarray:
    """uint8 [N,H,W,C] -> float32 [N,in_channels,size,size]: 3->1 by luma, centre zero-padding or an antialiased
    bilinear resize to size x size, 1->3 by copy, then (x / 255 - mean) / std per channel (mean, std: one value
    per input channel)."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise UserError(f"images must be uint8 [N,H,W,C], got {images.dtype} {list(images.shape)}")
    n, height, width, channels = images.shape
    if channels != in_channels and (channels, in_channels) not in ((1, 3), (3, 1)):
        raise UserError(f"cannot feed {channels}-channel images to a model with {in_channels} input channels")
    x = images.transpose(0, 3, 1, 2).astype(np.float32)
    if channels == 3 and in_channels == 1:
        x = (x * np.asarray(LUMA_WEIGHTS, np.float32).reshape(1, 3, 1, 1)).sum(axis=1, keepdims=True)
    x = fit_images(x, size)
    if x.shape[1] == 1 and in_channels == 3:
        x = np.repeat(x, 3, axis=1)
    mean32, std32 = (np.asarray(v, np.float32).reshape(1, -1, 1, 1) for v in (mean, std))
    scale, bias = np.float32(1.0) / (np.float32(255.0) * std32), -mean32 / std32
    # one rounding of x * scale + bias, like torch.addcmul's fused multiply-add: the same float32 bits
    return (x.astype(np.float64) * scale.astype(np.float64) + bias.astype(np.float64)).astype(np.float32)
