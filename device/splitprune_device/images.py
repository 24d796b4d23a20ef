"""Inputs of `splitprune-device infer`: image files, or a batch as IDX, .npy or .npz, as uint8 [N,H,W,C]."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from splitprune.errors import UserError
from splitprune.inputs import parse_idx, read_file_bytes

NETPBM = {b"P5": 1, b"P6": 3}  # binary PGM (grey) and PPM (RGB): readable without Pillow


def _as_nhwc(array: np.ndarray, source: str) -> np.ndarray:
    if array.dtype != np.uint8:
        raise UserError(f"{source}: images must be uint8, got {array.dtype}")
    if array.ndim == 3:   # [N, H, W]: grey
        return array[..., None]
    if array.ndim == 4 and array.shape[3] in (1, 3):
        return array
    raise UserError(f"{source}: expected images [N,H,W] or [N,H,W,C] (C = 1 or 3), got shape {list(array.shape)}")


def _read_netpbm(data: bytes, source: str) -> np.ndarray:
    fields, pos = [], 2
    while len(fields) < 3:  # width, height, maxval, separated by whitespace (and comments)
        while pos < len(data) and data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos)
            continue
        start = pos
        while pos < len(data) and data[pos:pos + 1].isdigit():
            pos += 1
        if start == pos:
            raise UserError(f"{source} is not a valid PGM/PPM file")
        fields.append(int(data[start:pos]))
    width, height, maxval = fields
    channels = NETPBM[data[:2]]
    pixels = np.frombuffer(data, np.uint8, offset=pos + 1)
    if maxval != 255 or pixels.size != width * height * channels:
        raise UserError(f"{source}: only 8-bit PGM/PPM files of the size their header says are supported")
    return pixels.reshape(1, height, width, channels)


def _read_image(path: Path) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise UserError(f"reading {path.suffix or path.name} files needs Pillow: "
                        "pip install 'splitprune-device[images]' (or give .npy, .npz, IDX, PGM or PPM)") from None
    try:
        with Image.open(path) as img:
            img = img if img.mode in ("L", "RGB") else img.convert("RGB")
            return _as_nhwc(np.asarray(img)[None], str(path))
    except OSError as exc:
        raise UserError(f"cannot read image {path}: {exc}") from None


def read_inputs(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 images [N,H,W,C] from one file, and labels [N] when the file holds them (.npz 'labels')."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such input file: {path}")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                if "images" not in data:
                    raise UserError(f"{path} holds {sorted(data.files)}; expected an array named 'images'")
                labels = data["labels"].astype(np.int64) if "labels" in data else None
                return _as_nhwc(data["images"], str(path)), labels
        except ValueError as exc:
            raise UserError(f"cannot read {path}: {exc}") from None
    if path.suffix == ".npy":
        try:
            return _as_nhwc(np.load(path, allow_pickle=False), str(path)), None
        except ValueError as exc:
            raise UserError(f"cannot read {path}: {exc}") from None
    head = path.open("rb").read(4)
    if head[:2] in NETPBM:
        return _read_netpbm(path.read_bytes(), str(path)), None
    if head[:2] == b"\x00\x00" or head[:2] == b"\x1f\x8b":  # IDX, raw or gzip (as the Fashion-MNIST files)
        return _as_nhwc(parse_idx(read_file_bytes(path), str(path)), str(path)), None
    return _read_image(path), None


def read_labels(path: str | Path) -> np.ndarray:
    """Class ids from an IDX labels file or a .npy vector."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such labels file: {path}")
    labels = np.load(path, allow_pickle=False) if path.suffix == ".npy" else parse_idx(read_file_bytes(path), str(path))
    if labels.ndim != 1:
        raise UserError(f"{path}: labels must be a vector, got shape {list(labels.shape)}")
    return labels.astype(np.int64)
