"""CIFAR-10 / CIFAR-100 in their standard "python version" layout.

The batches are Python pickles. They are read with :class:`RestrictedUnpickler`, which resolves only the
globals that numpy arrays need (``_reconstruct``, ``ndarray``, ``dtype``) and ``_codecs.encode`` (how
Python 3 writes bytes at protocol 2); any other global, e.g. ``os.system``, is refused with a UserError, so
a tampered file cannot run code.
"""

from __future__ import annotations

import _codecs
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from splitprune.errors import UserError

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _codecs.encode,
}
CIFAR_SIDE = 32
CIFAR_ROW_BYTES = 3 * CIFAR_SIDE * CIFAR_SIDE
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals a CIFAR batch contains (see module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def restricted_load(file: BinaryIO) -> Any:
    return RestrictedUnpickler(file, encoding="bytes").load()


def load_pickle(path: Path) -> dict:
    try:
        with path.open("rb") as file:
            content = restricted_load(file)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    except Exception as exc:  # anything a malformed or hostile pickle raises while being decoded
        raise UserError(f"{path} is not a valid CIFAR batch: {exc}") from exc
    if not isinstance(content, dict):
        raise UserError(f"{path} is not a valid CIFAR batch: expected a dict, found {type(content).__name__}")
    return content


@dataclass(frozen=True)
class CifarLayout:
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    meta_file: str
    names_key: bytes
    num_classes: int

    def split_files(self, train: bool) -> tuple[str, ...]:
        return self.train_files if train else self.test_files


CIFAR_LAYOUTS = {
    "cifar10": CifarLayout(
        "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
        b"labels", "batches.meta", b"label_names", 10,
    ),
    "cifar100": CifarLayout(
        "cifar-100-python", ("train",), ("test",), b"fine_labels", "meta", b"fine_label_names", 100
    ),
}


def resolve_cifar_dir(data_dir: Path, layout: CifarLayout) -> Path:
    """Accept the extracted folder itself or its parent."""
    holds_batches = any((data_dir / name).is_file() for name in layout.train_files + layout.test_files)
    return data_dir if holds_batches else data_dir / layout.folder


def missing_cifar_files(data_dir: Path, layout: CifarLayout, train: bool) -> list[str]:
    root = resolve_cifar_dir(data_dir, layout)
    return [str(root / name) for name in layout.split_files(train) if not (root / name).is_file()]


def batch_to_arrays(batch: dict, layout: CifarLayout, path: Path) -> tuple[np.ndarray, np.ndarray]:
    if b"data" not in batch or layout.label_key not in batch:
        raise UserError(f"{path} lacks the keys b'data' and {layout.label_key!r}: found {sorted(batch)}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[layout.label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_ROW_BYTES:
        raise UserError(f"{path}: b'data' should be uint8 [N,{CIFAR_ROW_BYTES}], found {data.dtype} {list(data.shape)}")
    if labels.shape != (len(data),):
        raise UserError(f"{path}: {labels.size} labels for {len(data)} images")
    if labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise UserError(f"{path}: labels outside 0..{layout.num_classes - 1}")
    images = data.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def class_names(root: Path, layout: CifarLayout) -> list[str]:
    meta_path = root / layout.meta_file
    if meta_path.is_file():
        names = load_pickle(meta_path).get(layout.names_key)
        if isinstance(names, list) and len(names) == layout.num_classes:
            return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    if layout.num_classes == len(CIFAR10_CLASSES):
        return list(CIFAR10_CLASSES)
    return [str(i) for i in range(layout.num_classes)]


def load_cifar(data_dir: Path, variant: str, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load one split as uint8 images [N,32,32,3] (HWC), int64 labels [N] and the class names."""
    layout = CIFAR_LAYOUTS[variant]
    missing = missing_cifar_files(data_dir, layout, train)
    if missing:
        raise UserError(f"missing CIFAR files: {', '.join(missing)}")
    root = resolve_cifar_dir(data_dir, layout)
    parts = [batch_to_arrays(load_pickle(root / name), layout, root / name) for name in layout.split_files(train)]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return images, labels, class_names(root, layout)
