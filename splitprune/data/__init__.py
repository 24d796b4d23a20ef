"""Datasets held in memory as uint8 and batched through vectorised, seeded torch transforms."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splitprune.data.cifar import CIFAR_LAYOUTS, load_cifar, missing_cifar_files
from splitprune.data.folder import load_image_folder, missing_folder_files
from splitprune.data.idx import load_idx_split, missing_idx_files
from splitprune.data.transforms import BatchTransform, check_channels, fit_uint8_images
from splitprune.errors import UserError

__all__ = ["DATASETS", "DatasetInfo", "ImageDataset", "load_dataset", "subset", "hold_out", "BatchLoader", "make_loaders",
           "validation_loader"]

VALIDATION_SEED = 7919  # fixed, not the run's seed: every run holding out n images holds out the same ones


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int | None
    in_channels: int
    native_size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_dir: str | None
    augment_by_default: bool
    how_to_get: str


IDX_FILES_HINT = "train-/t10k-images-idx3-ubyte and train-/t10k-labels-idx1-ubyte, .gz or raw"
DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), "/usr/share/datasets/fashion-mnist", False,
        "apt-get install dataset-fashion-mnist (files under /usr/share/datasets/fashion-mnist/),"
        " or pass --data-dir DIR holding the IDX files",
    ),
    "mnist": DatasetInfo(
        "mnist", 10, 1, 28, (0.1307,), (0.3081,), "/usr/share/datasets/mnist", False,
        f"put the four MNIST IDX files ({IDX_FILES_HINT}) in /usr/share/datasets/mnist/,"
        " or pass --data-dir DIR holding them",
    ),
    "cifar10": DatasetInfo(
        "cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), None, True,
        "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extract it and"
        " pass --data-dir DIR (DIR/cifar-10-batches-py/ or that folder itself)",
    ),
    "cifar100": DatasetInfo(
        "cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), None, True,
        "download cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extract it and"
        " pass --data-dir DIR (DIR/cifar-100-python/ or that folder itself)",
    ),
    "folder": DatasetInfo(
        "folder", None, 3, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), None, True,
        "arrange images as DIR/train/<class>/*.png and DIR/test/<class>/*.png (.jpg/.jpeg/.bmp too,"
        " e.g. an STL-10 or ImageNet-100 export) and pass --data-dir DIR",
    ),
}
CLASS_NAMES = {
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    "mnist": [str(digit) for digit in range(10)],
}


@dataclass
class ImageDataset:
    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise UserError(f"images must be uint8 [N,H,W,C], got {self.images.dtype} {list(self.images.shape)}")
        if self.labels.shape != (len(self.images),):
            raise UserError(f"{len(self.images)} images but labels of shape {list(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.labels)


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def resolve_data_dir(info: DatasetInfo, data_dir: str | None) -> Path:
    if data_dir is None and info.default_dir is None:
        raise UserError(f"{info.name} has no default location: pass --data-dir DIR. To get it: {info.how_to_get}")
    return Path(data_dir if data_dir is not None else info.default_dir).expanduser()


def missing_files(info: DatasetInfo, directory: Path, train: bool) -> list[str]:
    if info.name in CIFAR_LAYOUTS:
        return missing_cifar_files(directory, CIFAR_LAYOUTS[info.name], train)
    if info.name == "folder":
        return missing_folder_files(directory, train)
    return [str(directory / name) for name in missing_idx_files(directory, "train" if train else "t10k")]


def read_split(
    info: DatasetInfo, directory: Path, train: bool, image_size: int | None, channels: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if info.name in CIFAR_LAYOUTS:
        return load_cifar(directory, info.name, train)
    if info.name == "folder":
        if image_size is None:
            raise UserError("folder datasets need an image size to resize every image to")
        return load_image_folder(directory, train, image_size, channels)
    images, labels = load_idx_split(directory, "train" if train else "t10k", info.num_classes)
    return images, labels, list(CLASS_NAMES[info.name])


def load_split(
    name: str, data_dir: str | None, train: bool, image_size: int | None, channels: int | None = None
) -> ImageDataset:
    info = dataset_info(name)
    if image_size is not None and image_size <= 0:
        raise UserError(f"image size must be positive, got {image_size}")
    directory = resolve_data_dir(info, data_dir)
    missing = missing_files(info, directory, train)
    if missing:
        split = "training" if train else "test"
        where = str(directory) if directory.is_dir() else f"{directory} (no such directory)"
        raise UserError(
            f"{name} {split} data not found in {where}: looked for {', '.join(missing)}. To get it: {info.how_to_get}"
        )
    images, labels, classes = read_split(info, directory, train, image_size, channels or info.in_channels)
    if image_size is not None:
        images = fit_uint8_images(images, image_size)
    return ImageDataset(images, labels, info.num_classes or len(classes), classes)


def load_dataset(
    name: str, data_dir: str | None = None, train: bool = True, image_size: int | None = None
) -> ImageDataset:
    """Load one split of ``name`` into memory; ``image_size`` pads or resizes every image at load time
    (required for "folder", whose images are resized shorter side first and centre-cropped)."""
    return load_split(name, data_dir, train, image_size)


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded permutation in which every prefix holds each class in proportion to its frequency."""
    order = np.random.default_rng(seed).permutation(len(labels))
    shuffled = labels[order]
    counts = np.bincount(shuffled)
    by_class = np.argsort(shuffled, kind="stable")
    rank = np.empty(len(labels), dtype=np.int64)
    rank[by_class] = np.arange(len(labels)) - (np.cumsum(counts) - counts)[shuffled[by_class]]
    return order[np.argsort((rank + 0.5) / counts[shuffled], kind="stable")]


def subset(ds: ImageDataset, n: int | None, seed: int) -> ImageDataset:
    """A seeded, class-stratified subset of ``n`` samples (kept in dataset order); None or n >= len: the whole set."""
    if n is None or n >= len(ds):
        return ds
    if n <= 0:
        raise UserError(f"a subset needs a positive number of samples, got {n}")
    return _take(ds, np.sort(stratified_order(ds.labels, seed)[:n]))


def _take(ds: ImageDataset, indices: np.ndarray) -> ImageDataset:
    return ImageDataset(ds.images[indices], ds.labels[indices], ds.num_classes, ds.classes)


def hold_out(ds: ImageDataset, n: int) -> tuple[ImageDataset, ImageDataset]:
    """(the rest, a validation split of n samples): class-stratified, drawn with VALIDATION_SEED whatever the
    run's seed, so every training subset drawn from the rest is disjoint from it. n = 0: (ds, empty)."""
    if n < 0 or n >= len(ds):
        raise UserError(f"a validation split needs 0 to {len(ds) - 1} of the {len(ds)} training samples, got {n}")
    order = stratified_order(ds.labels, VALIDATION_SEED)
    return _take(ds, np.sort(order[n:])), _take(ds, np.sort(order[:n]))


def derive_seed(seed: int, epoch: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed % 2**64, epoch % 2**64, stream]).generate_state(1, np.uint64)[0])


class BatchLoader:
    """Iterates (x float32 [B,C,S,S], y int64 [B]); shuffling and augmentation depend only on (seed, epoch):
    call :meth:`set_epoch` before each epoch (the epoch is not advanced by iterating)."""

    SHUFFLE_STREAM, AUGMENT_STREAM = 0, 1

    def __init__(
        self,
        ds: ImageDataset,
        batch_size: int,
        input_size: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool,
        augment: bool,
        seed: int,
        drop_last: bool = False,
    ):
        if batch_size <= 0:
            raise UserError(f"batch size must be positive, got {batch_size}")
        check_channels(ds.images.shape[3], in_channels)
        self.dataset = ds
        self.batch_size, self.input_size, self.in_channels = batch_size, input_size, in_channels
        self.shuffle, self.augment, self.seed, self.drop_last = shuffle, augment, seed, drop_last
        self.mean, self.std = tuple(mean), tuple(std)
        self.transform = BatchTransform(input_size, in_channels, mean, std, augment)
        self.images = torch.from_numpy(np.ascontiguousarray(ds.images))
        self.labels = torch.from_numpy(ds.labels.astype(np.int64, copy=False))
        self.epoch = 0

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        count = len(self.dataset)
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def generator(self, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, stream))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        count = len(self.dataset)
        order = torch.randperm(count, generator=self.generator(self.SHUFFLE_STREAM)) if self.shuffle else None
        augment_generator = self.generator(self.AUGMENT_STREAM)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = order[start:start + self.batch_size] if order is not None else slice(start, start + self.batch_size)
            yield self.transform(self.images[batch], augment_generator), self.labels[batch]


def make_loaders(
    name: str,
    data_dir: str | None,
    batch_size: int,
    input_size: int,
    in_channels: int,
    seed: int,
    train_subset: int | None = None,
    test_subset: int | None = None,
    augment: bool | None = None,
    test_batch_size: int = 256,
    validation_size: int = 0,
    normalisation: tuple[Sequence[float] | None, Sequence[float] | None] = (None, None),
) -> tuple[BatchLoader, BatchLoader, int]:
    """(train loader, test loader, number of classes); ``augment`` None uses the dataset's default. The
    training subset is drawn from what is left after holding out ``validation_size`` images (:func:`hold_out`).
    ``normalisation``: (mean, std), None for the dataset's."""
    info = dataset_info(name)
    mean, std = normalisation[0] or info.mean, normalisation[1] or info.std
    load_size = input_size if info.native_size is None else None
    load_channels = in_channels if info.name == "folder" else info.in_channels
    train_all = load_split(name, data_dir, True, load_size, load_channels)
    if validation_size:
        train_all = hold_out(train_all, validation_size)[0]
    train_set = subset(train_all, train_subset, seed)
    test_set = subset(load_split(name, data_dir, False, load_size, load_channels), test_subset, seed)
    augment = info.augment_by_default if augment is None else augment
    common = dict(input_size=input_size, in_channels=in_channels, mean=mean, std=std, seed=seed)
    lone_last = len(train_set.labels) % batch_size == 1  # BatchNorm cannot train on a batch of one
    train_loader = BatchLoader(train_set, batch_size, shuffle=True, augment=augment, drop_last=lone_last, **common)
    test_loader = BatchLoader(test_set, test_batch_size, shuffle=False, augment=False, **common)
    return train_loader, test_loader, train_set.num_classes


def calibration_batches(train: BatchLoader, images: int, batch_size: int) -> list[torch.Tensor]:
    """The first `images` of a seeded, class-stratified order of the training set, prepared like the test set
    (no augmentation) in batches of `batch_size`: what a calibration round (precise BN) feeds the model."""
    chosen = subset(train.dataset, images, train.seed)
    loader = BatchLoader(chosen, batch_size, train.input_size, train.in_channels, train.mean, train.std,
                         shuffle=False, augment=False, seed=train.seed)
    batches = [x for x, _ in loader]
    if batches and len(batches[-1]) == 1 and len(batches) > 1:  # BatchNorm cannot average a batch of one
        batches = batches[:-1]
    return batches


def validation_loader(name: str, data_dir: str | None, input_size: int, in_channels: int, validation_size: int,
                      batch_size: int = 256,
                      normalisation: tuple[Sequence[float] | None, Sequence[float] | None] = (None, None)
                      ) -> BatchLoader:
    """The held-out validation images (:func:`hold_out`), prepared like the test set (no augmentation)."""
    if validation_size <= 0:
        raise UserError("this run holds out no validation images (validation_size is 0)")
    info = dataset_info(name)
    load_size = input_size if info.native_size is None else None
    load_channels = in_channels if info.name == "folder" else info.in_channels
    held = hold_out(load_split(name, data_dir, True, load_size, load_channels), validation_size)[1]
    return BatchLoader(held, batch_size, input_size=input_size, in_channels=in_channels,
                       mean=normalisation[0] or info.mean, std=normalisation[1] or info.std, shuffle=False,
                       augment=False, seed=0)
