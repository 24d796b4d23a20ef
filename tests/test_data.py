import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from splitprune.data import DATASETS, BatchLoader, ImageDataset, load_dataset, make_loaders, subset
from splitprune.data.cifar import restricted_load
from splitprune.data.idx import read_idx
from splitprune.data.transforms import BatchTransform, random_crop_flip
from splitprune.errors import UserError

FASHION_DIR = Path(DATASETS["fashion-mnist"].default_dir)
needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(), reason="apt-get install dataset-fashion-mnist"
)


@pytest.fixture(scope="module")
def fashion_train() -> ImageDataset:
    return load_dataset("fashion-mnist", train=True)


def idx_bytes(array: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx_set(folder: Path, images: np.ndarray, labels: np.ndarray, prefix: str, compress: bool) -> None:
    for kind, array in (("images-idx3", images), ("labels-idx1", labels.astype(np.uint8))):
        data = idx_bytes(array)
        name = f"{prefix}-{kind}-ubyte"
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


def uniform_dataset(n: int, side: int = 4, channels: int = 1) -> ImageDataset:
    """Image i is filled with i % 256 and labelled i, so a batch tells which samples it holds."""
    images = np.broadcast_to((np.arange(n) % 256).astype(np.uint8)[:, None, None, None], (n, side, side, channels))
    return ImageDataset(np.ascontiguousarray(images), np.arange(n, dtype=np.int64), n, [str(i) for i in range(n)])


def loader(ds: ImageDataset, **overrides) -> BatchLoader:
    options = dict(batch_size=10, input_size=ds.images.shape[1], in_channels=ds.images.shape[3], mean=(0.0,),
                   std=(1.0,), shuffle=True, augment=False, seed=7)
    return BatchLoader(ds, **{**options, **overrides})


def epoch_batches(batch_loader: BatchLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batch_loader.set_epoch(epoch)
    return list(batch_loader)


# IDX: Fashion-MNIST and MNIST


@needs_fashion
def test_real_fashion_mnist_loads(fashion_train):
    test = load_dataset("fashion-mnist", train=False)
    assert fashion_train.images.shape == (60000, 28, 28, 1) and fashion_train.images.dtype == np.uint8
    assert test.images.shape == (10000, 28, 28, 1) and test.labels.dtype == np.int64
    assert fashion_train.num_classes == 10 and len(fashion_train.classes) == 10
    assert np.bincount(fashion_train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10


@needs_fashion
def test_raw_and_gz_idx_give_the_same_data(tmp_path, fashion_train):
    images, labels = fashion_train.images[:50, :, :, 0], fashion_train.labels[:50]
    raw_dir, gz_dir = tmp_path / "raw", tmp_path / "gz"
    for folder, compress in ((raw_dir, False), (gz_dir, True)):
        folder.mkdir()
        write_idx_set(folder, images, labels, "train", compress)
        write_idx_set(folder, images[:20], labels[:20], "t10k", compress)
    assert np.array_equal(read_idx(raw_dir / "train-images-idx3-ubyte"), images)
    from_raw = load_dataset("mnist", str(raw_dir))
    from_gz = load_dataset("mnist", str(gz_dir), train=False)
    assert np.array_equal(from_raw.images[..., 0], images) and np.array_equal(from_raw.labels, labels)
    assert np.array_equal(from_gz.images[..., 0], images[:20]) and np.array_equal(from_gz.labels, labels[:20])


@pytest.mark.parametrize(
    "content",
    [
        idx_bytes(np.zeros((3, 4, 4), np.uint8))[:-5],
        b"\x12\x34" + idx_bytes(np.zeros((3, 4, 4), np.uint8))[2:],
        gzip.compress(idx_bytes(np.zeros((3, 4, 4), np.uint8)))[:-12],
        b"",
    ],
    ids=["truncated", "bad-magic", "broken-gzip", "empty"],
)
def test_corrupt_idx_is_a_user_error_naming_the_file(tmp_path, content):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(UserError, match="train-images-idx3-ubyte"):
        read_idx(path)


def test_idx_labels_must_match_images(tmp_path):
    write_idx_set(tmp_path, np.zeros((5, 4, 4), np.uint8), np.zeros(4, np.uint8), "train", compress=False)
    with pytest.raises(UserError, match="labels"):
        load_dataset("mnist", str(tmp_path))


def test_missing_data_says_where_and_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist") as info:
        load_dataset("fashion-mnist", str(tmp_path / "nowhere"))
    assert "nowhere" in str(info.value)
    with pytest.raises(UserError, match="train-images-idx3-ubyte") as info:
        load_dataset("fashion-mnist", str(tmp_path))
    assert "--data-dir" in str(info.value)
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        load_dataset("cifar10")
    with pytest.raises(UserError, match="data_batch_1"):
        load_dataset("cifar10", str(tmp_path))


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(UserError, match="fashion-mnist.*cifar10.*folder"):
        load_dataset("imagenet-22k")


# CIFAR


def cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def py2_pickle(batch: dict) -> bytes:
    """A batch pickled the way the published CIFAR files were: Python 2 cPickle, protocol 2, byte strings."""

    def string(b: bytes) -> bytes:
        return b"T" + struct.pack("<i", len(b)) + b

    def integer(v: int) -> bytes:
        return b"J" + struct.pack("<i", v)

    def array(a: np.ndarray) -> bytes:
        dtype = (b"cnumpy\ndtype\n" + string(b"u1") + integer(0) + integer(1) + b"\x87R(" + integer(3)
                 + string(b"|") + b"NNN" + integer(-1) + integer(-1) + integer(0) + b"tb")
        shape = b"(" + b"".join(integer(d) for d in a.shape) + b"t"
        return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + integer(0) + b"\x85" + string(b"b")
                + b"\x87R(" + integer(1) + shape + dtype + b"\x89" + string(a.tobytes()) + b"tb")

    def value(v) -> bytes:
        return array(v) if isinstance(v, np.ndarray) else b"](" + b"".join(integer(x) for x in v) + b"e"

    return b"\x80\x02}(" + b"".join(string(k) + value(v) for k, v in batch.items()) + b"u."


def write_cifar10(root: Path, per_batch: int, legacy: bool = False) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data, labels = cifar_rows(per_batch, i), [(i + j) % 10 for j in range(per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data}
        (folder / name).write_bytes(py2_pickle(batch) if legacy else pickle.dumps(batch, protocol=2))
        written[name] = (data, labels)
    names = [b"plane", b"car", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))
    return written


def chw_rows_to_hwc(rows: np.ndarray) -> np.ndarray:
    images = np.empty((len(rows), 32, 32, 3), np.uint8)
    for c in range(3):
        for y in range(32):
            images[:, y, :, c] = rows[:, c * 1024 + y * 32:c * 1024 + (y + 1) * 32]
    return images


@pytest.mark.parametrize("legacy", [False, True], ids=["py3-protocol2", "py2-cpickle"])
def test_cifar10_batches_load_as_hwc(tmp_path, legacy):
    written = write_cifar10(tmp_path, per_batch=4, legacy=legacy)
    train = load_dataset("cifar10", str(tmp_path))
    test = load_dataset("cifar10", str(tmp_path / "cifar-10-batches-py"), train=False)
    train_rows = np.concatenate([written[f"data_batch_{k}"][0] for k in range(1, 6)])
    assert train.images.shape == (20, 32, 32, 3) and train.images.dtype == np.uint8
    assert np.array_equal(train.images, chw_rows_to_hwc(train_rows))
    assert train.labels.tolist() == sum((written[f"data_batch_{k}"][1] for k in range(1, 6)), [])
    assert np.array_equal(test.images, chw_rows_to_hwc(written["test_batch"][0]))
    assert train.num_classes == 10 and train.classes[1] == "car"


def test_cifar100_loads_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 6), ("test", 3)):
        batch = {b"data": cifar_rows(n, n), b"fine_labels": [99 - j for j in range(n)], b"coarse_labels": [0] * n}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    train = load_dataset("cifar100", str(tmp_path))
    test = load_dataset("cifar100", str(folder), train=False)
    assert train.num_classes == 100 and train.labels.tolist() == [99, 98, 97, 96, 95, 94]
    assert np.array_equal(test.images, chw_rows_to_hwc(cifar_rows(3, 3)))


class RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    write_cifar10(tmp_path, per_batch=2)
    hostile = {b"data": cifar_rows(2, 0), b"labels": [0, 1], b"x": RunsShell(marker)}
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(hostile, protocol=2))
    with pytest.raises(UserError, match="test_batch.*system"):
        load_dataset("cifar10", str(tmp_path), train=False)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        restricted_load(__import__("io").BytesIO(b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R."))


def test_cifar_with_wrong_row_size_is_rejected(tmp_path):
    write_cifar10(tmp_path, per_batch=2)
    bad = {b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(UserError, match="3072"):
        load_dataset("cifar10", str(tmp_path), train=False)


# Image folders

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def striped_image(width: int, height: int, centre: tuple[int, int, int]) -> Image.Image:
    """Centre colour, with blue 2-pixel bands at the ends of the longer side (cut off by a centre crop)."""
    pixels = np.tile(np.array(centre, np.uint8), (height, width, 1))
    if width > height:
        pixels[:, :2], pixels[:, -2:] = BLUE, BLUE
    return Image.fromarray(pixels)


def write_folder_set(root: Path) -> None:
    for split, count in (("train", 3), ("test", 1)):
        for name, colour in (("cat", RED), ("dog", GREEN)):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                striped_image(24, 16, colour).save(root / split / name / f"{i}.png")
    striped_image(16, 16, GREEN).save(root / "train" / "dog" / "big.jpg", quality=100)
    (root / "train" / "dog" / "notes.txt").write_text("not an image")


def test_folder_dataset_resizes_and_centre_crops(tmp_path):
    write_folder_set(tmp_path)
    train = load_dataset("folder", str(tmp_path), image_size=4)
    test = load_dataset("folder", str(tmp_path), train=False, image_size=4)
    assert train.classes == ["cat", "dog"] and train.num_classes == 2
    assert train.images.shape == (7, 4, 4, 3) and train.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert (train.images[:3] == RED).all() and (train.images[3:6] == GREEN).all()
    assert np.abs(train.images[6].astype(int) - GREEN).max() <= 8
    assert test.labels.tolist() == [0, 1]


def test_folder_dataset_errors(tmp_path):
    write_folder_set(tmp_path)
    with pytest.raises(UserError, match="image size"):
        load_dataset("folder", str(tmp_path))
    with pytest.raises(UserError, match="test/<class>"):
        load_dataset("folder", str(tmp_path / "train"), train=False, image_size=4)
    (tmp_path / "test" / "cat" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(UserError, match="broken.png"):
        load_dataset("folder", str(tmp_path), train=False, image_size=4)


def test_folder_loaders_decode_grey_for_one_channel_models(tmp_path):
    write_folder_set(tmp_path)
    train, test, num_classes = make_loaders("folder", str(tmp_path), 4, 6, 1, seed=0)
    assert num_classes == 2 and train.dataset.images.shape == (7, 6, 6, 1)
    x, y = next(iter(test))
    assert x.shape == (2, 1, 6, 6) and y.tolist() == [0, 1]


# Transforms


def test_padding_28_to_32_centres_the_image():
    images = torch.full((2, 28, 28, 1), 255, dtype=torch.uint8)
    out = BatchTransform(32, 1, (0.0,), (1.0,), augment=False)(images)
    assert out.shape == (2, 1, 32, 32) and out.dtype == torch.float32
    assert (out[:, :, 2:30, 2:30] == 1).all() and out.sum() == 2 * 28 * 28


def test_resize_and_channel_conversion():
    grey = torch.randint(0, 256, (3, 8, 8, 1), dtype=torch.uint8)
    rgb = BatchTransform(16, 3, (0.5,), (0.25,), augment=False)(grey)
    assert rgb.shape == (3, 3, 16, 16)
    assert torch.equal(rgb[:, 0], rgb[:, 1]) and torch.equal(rgb[:, 0], rgb[:, 2])
    flat = torch.full((1, 32, 32, 1), 51, dtype=torch.uint8)
    assert torch.allclose(BatchTransform(8, 1, (0.0,), (1.0,), augment=False)(flat), torch.tensor(0.2))
    colour = torch.tensor([255, 0, 0], dtype=torch.uint8).expand(1, 4, 4, 3)
    luma = BatchTransform(4, 1, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), augment=False)(colour)
    assert luma.shape == (1, 1, 4, 4) and torch.allclose(luma, torch.tensor(0.299))


@needs_fashion
def test_normalised_fashion_mnist_has_zero_mean_unit_std(fashion_train):
    info = DATASETS["fashion-mnist"]
    batches = BatchLoader(fashion_train, 8192, 28, 1, info.mean, info.std, shuffle=False, augment=False, seed=0)
    x = torch.cat([x for x, _ in batches])
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3


def test_random_crop_flip_takes_shifted_windows():
    x = torch.randint(1, 256, (64, 3, 6, 6), dtype=torch.uint8)
    out = random_crop_flip(x, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    windows = [padded[:, :, dy:dy + 6, dx:dx + 6] for dy in range(5) for dx in range(5)]
    candidates = torch.stack(windows + [w.flip(-1) for w in windows], dim=1)
    assert (candidates == out[:, None]).flatten(2).all(-1).any(1).all()
    unshifted = random_crop_flip(x, 0, torch.Generator().manual_seed(0))
    flipped = (unshifted == x.flip(-1)).flatten(1).all(1)
    assert ((unshifted == x).flatten(1).all(1) | flipped).all() and 10 < flipped.sum() < 54


def test_augmentation_is_reproducible_per_seed_and_epoch():
    ds = ImageDataset(np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8),
                      np.zeros(40, np.int64), 1, ["x"])
    first, second = loader(ds, augment=True), loader(ds, augment=True)
    epoch3 = epoch_batches(first, 3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch3, epoch_batches(second, 3)))
    assert not torch.equal(epoch3[0][0], epoch_batches(first, 4)[0][0])
    plain = loader(ds, augment=False, shuffle=False)
    augmented = loader(ds, augment=True, shuffle=False)
    assert not torch.equal(next(iter(plain))[0], next(iter(augmented))[0])


# Subsets and loaders


@needs_fashion
def test_subset_is_seeded_and_stratified(fashion_train):
    picked = subset(fashion_train, 100, seed=1)
    assert len(picked) == 100 and np.bincount(picked.labels).tolist() == [10] * 10
    assert np.array_equal(picked.images, subset(fashion_train, 100, seed=1).images)
    assert not np.array_equal(picked.images, subset(fashion_train, 100, seed=2).images)
    assert subset(fashion_train, None, 0) is fashion_train and subset(fashion_train, 10**6, 0) is fashion_train
    with pytest.raises(UserError):
        subset(fashion_train, 0, 0)


def test_subset_keeps_class_proportions():
    labels = np.array([0] * 80 + [1] * 20)
    ds = ImageDataset(np.zeros((100, 2, 2, 1), np.uint8), labels, 2, ["a", "b"])
    assert np.bincount(subset(ds, 10, seed=3).labels).tolist() == [8, 2]


def test_shuffled_loader_covers_every_sample_once_per_epoch():
    batches = epoch_batches(loader(uniform_dataset(103)), 0)
    assert [len(y) for _, y in batches] == [10] * 10 + [3]
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(103)) and seen.tolist() != list(range(103))
    assert all(torch.allclose(x[:, 0, 0, 0] * 255, (y % 256).float()) for x, y in batches)
    dropped = loader(uniform_dataset(103), drop_last=True)
    assert len(dropped) == 10 and sum(len(y) for _, y in dropped) == 100
    in_order = torch.cat([y for _, y in loader(uniform_dataset(103), shuffle=False)])
    assert in_order.tolist() == list(range(103))


def test_two_loaders_with_one_seed_agree_and_resume():
    ds = uniform_dataset(50)
    first, second = loader(ds), loader(ds)
    orders = [torch.cat([y for _, y in epoch_batches(first, epoch)]) for epoch in range(3)]
    assert not torch.equal(orders[0], orders[1])
    assert torch.equal(torch.cat([y for _, y in epoch_batches(second, 2)]), orders[2])
    other_seed = torch.cat([y for _, y in epoch_batches(loader(ds, seed=8), 0)])
    assert not torch.equal(other_seed, orders[0])


@needs_fashion
def test_make_loaders_on_fashion_mnist():
    train, test, num_classes = make_loaders("fashion-mnist", None, 16, 32, 3, seed=0, train_subset=200,
                                            test_subset=100, test_batch_size=64)
    x, y = next(iter(train))
    assert num_classes == 10 and len(train) == 13 and len(test) == 2
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert not train.augment and DATASETS["cifar10"].augment_by_default
    border = (0 - DATASETS["fashion-mnist"].mean[0]) / DATASETS["fashion-mnist"].std[0]
    assert torch.allclose(x[:, :, :2], torch.tensor(border))
