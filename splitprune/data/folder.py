"""Class-per-folder image sets, ``root/{train,test}/<class>/*.png|jpg|jpeg|bmp`` (STL-10, ImageNet-100 exports)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from splitprune.errors import UserError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})


def split_dir(root: Path, train: bool) -> Path:
    return root / ("train" if train else "test")


def class_dirs(split: Path) -> list[str]:
    return sorted(entry.name for entry in split.iterdir() if entry.is_dir()) if split.is_dir() else []


def folder_classes(root: Path) -> list[str]:
    """Class names from both splits, so that a class gets the same index in train and test."""
    return sorted(set(class_dirs(split_dir(root, True))) | set(class_dirs(split_dir(root, False))))


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def list_samples(split: Path, classes: list[str]) -> list[tuple[Path, int]]:
    present = [(label, split / name) for label, name in enumerate(classes) if (split / name).is_dir()]
    return [(path, label) for label, folder in present for path in image_files(folder)]


def missing_folder_files(root: Path, train: bool) -> list[str]:
    split = split_dir(root, train)
    has_images = any(image_files(split / name) for name in class_dirs(split))
    return [] if has_images else [f"{split}/<class>/*{{{','.join(sorted(IMAGE_SUFFIXES))}}}"]


def decode_image(path: Path, size: int, mode: str) -> np.ndarray:
    """Decode, convert to ``mode`` ("RGB" or "L"), resize the shorter side to ``size`` and centre-crop to square."""
    try:
        with Image.open(path) as image:
            image.draft(mode, (size, size))
            fitted = ImageOps.fit(image.convert(mode), (size, size), method=Image.Resampling.BILINEAR)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise UserError(f"cannot decode image {path}: {exc}") from exc
    return np.asarray(fitted, dtype=np.uint8).reshape(size, size, -1)


def load_image_folder(
    root: Path, train: bool, image_size: int, channels: int = 3
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode one split into uint8 images [N,S,S,C] and int64 labels [N]; also return the class names."""
    if channels not in (1, 3):
        raise UserError(f"image folders load with 1 or 3 channels, not {channels}")
    if image_size <= 0:
        raise UserError(f"image_size must be positive, got {image_size}")
    classes = folder_classes(root)
    split = split_dir(root, train)
    samples = list_samples(split, classes)
    if not samples:
        raise UserError(f"no images found under {split}/<class>/")
    mode = "L" if channels == 1 else "RGB"
    images = np.empty((len(samples), image_size, image_size, channels), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        decoded = pool.map(lambda sample: decode_image(sample[0], image_size, mode), samples)
        for i, image in enumerate(tqdm(decoded, total=len(samples), desc=f"decoding {split}", unit="img")):
            images[i] = image
    labels = np.fromiter((label for _, label in samples), dtype=np.int64, count=len(samples))
    return images, labels, classes
