"""Reader for IDX files, the format of MNIST and Fashion-MNIST (gzip-compressed or raw)."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from splitprune.errors import UserError

GZIP_MAGIC = b"\x1f\x8b"
IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def idx_candidates(data_dir: Path, stem: str) -> list[Path]:
    """The file names accepted for one IDX file, e.g. ``train-images-idx3-ubyte`` with or without ``.gz``."""
    return [data_dir / f"{stem}.gz", data_dir / stem]


def find_idx_file(data_dir: Path, stem: str) -> Path | None:
    return next((path for path in idx_candidates(data_dir, stem) if path.is_file()), None)


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


def idx_split_stems(prefix: str) -> tuple[str, str]:
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def missing_idx_files(data_dir: Path, prefix: str) -> list[str]:
    return [f"{stem}[.gz]" for stem in idx_split_stems(prefix) if find_idx_file(data_dir, stem) is None]


def load_idx_split(data_dir: Path, prefix: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Load ``{prefix}-images-idx3-ubyte[.gz]`` and its labels as uint8 [N,H,W,1] and int64 [N]."""
    image_stem, label_stem = idx_split_stems(prefix)
    image_path, label_path = find_idx_file(data_dir, image_stem), find_idx_file(data_dir, label_stem)
    if image_path is None or label_path is None:
        raise UserError(f"missing IDX files in {data_dir}: {', '.join(missing_idx_files(data_dir, prefix))}")
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise UserError(f"{image_path} should hold uint8 images [N,H,W], found {images.dtype} {list(images.shape)}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise UserError(f"{label_path} holds {list(labels.shape)} labels for {len(images)} images in {image_path}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"{label_path} has labels outside 0..{num_classes - 1}")
    return images[..., None], labels.astype(np.int64)
