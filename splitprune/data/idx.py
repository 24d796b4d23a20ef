"""IDX datasets (MNIST, Fashion-MNIST): which files a split needs, loading them (the reader is splitprune.inputs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from splitprune.errors import UserError
from splitprune.inputs import read_idx


def idx_candidates(data_dir: Path, stem: str) -> list[Path]:
    """The file names accepted for one IDX file, e.g. ``train-images-idx3-ubyte`` with or without ``.gz``."""
    return [data_dir / f"{stem}.gz", data_dir / stem]


def find_idx_file(data_dir: Path, stem: str) -> Path | None:
    return next((path for path in idx_candidates(data_dir, stem) if path.is_file()), None)


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
