"""Tiny fake data sets in the real on-disk formats, for tests that must not download anything.

Usage (e.g. an end-to-end training test)::

    from datamodule_fakes import write_fake_cifar10, patch_cifar_md5   # or tests.datamodule_fakes
    from lightning_msvag.datamodules import CIFAR10DataModule

    def test_something(tmp_path, monkeypatch):
        write_fake_cifar10(tmp_path, n_train=256, n_test=64)
        patch_cifar_md5(monkeypatch, CIFAR10DataModule, tmp_path)   # torchvision checks md5s
        dm = CIFAR10DataModule(str(tmp_path), batch_size=32, download=False)
        trainer.fit(model, datamodule=dm)

Fashion-MNIST needs no patching (torchvision does not checksum the uncompressed files):
``write_fake_fashion_mnist(tmp_path, 256, 64)`` and ``FashionMNISTDataModule(str(tmp_path), ...)``.

All writers are deterministic (``seed``), make every label occur (as far as ``n`` allows),
and return a :class:`FakeFiles` record.
"""

import gzip
import hashlib
import pickle
import struct
from pathlib import Path
from typing import Dict, List, NamedTuple, Union

import numpy as np

PathLike = Union[str, Path]


class FakeFiles(NamedTuple):
    """What a ``write_fake_*`` function wrote."""

    folder: Path  #: the folder holding the files (e.g. ``root/cifar-10-batches-py``)
    md5: Dict[str, str]  #: file name -> md5 of the written file
    train_labels: np.ndarray  #: int64 labels of the training set, in file order
    test_labels: np.ndarray  #: int64 labels of the test set, in file order
    train_images: np.ndarray  #: uint8, ``[N, 28, 28]`` (Fashion-MNIST) or ``[N, 32, 32, 3]`` (CIFAR, HWC)
    test_images: np.ndarray


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def _images(rng: np.random.Generator, n: int, shape: tuple) -> np.ndarray:
    """Random uint8 images with some per-image structure (not all pure noise)."""
    base = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    scale = rng.uniform(0.2, 1.0, size=(n,) + (1,) * len(shape))
    return (base * scale).astype(np.uint8)


# ------------------------------------------------------------------ Fashion-MNIST (IDX)
def _write_idx(path: Path, array: np.ndarray) -> None:
    """Uncompressed IDX: magic (0, 0, 0x08 = uint8, ndim), big-endian int32 dims, raw bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def write_fake_fashion_mnist(root: PathLike, n_train: int = 256, n_test: int = 64, seed: int = 0) -> FakeFiles:
    """Write the four uncompressed IDX files to ``root/FashionMNIST/raw/``."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "FashionMNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    train_x, test_x = _images(rng, n_train, (28, 28)), _images(rng, n_test, (28, 28))
    train_y, test_y = _labels(rng, n_train, 10), _labels(rng, n_test, 10)
    files = {
        "train-images-idx3-ubyte": train_x,
        "train-labels-idx1-ubyte": train_y,
        "t10k-images-idx3-ubyte": test_x,
        "t10k-labels-idx1-ubyte": test_y,
    }
    for name, array in files.items():
        _write_idx(folder / name, array)
    return FakeFiles(folder, {n: _md5(folder / n) for n in files}, train_y, test_y, train_x, test_x)


def gzip_fake_fashion_mnist(root: PathLike) -> Dict[str, str]:
    """Gzip the four fake IDX files (``name.gz`` beside them); return ``{gz name: md5}``."""
    folder = Path(root) / "FashionMNIST" / "raw"
    out = {}
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        gz = folder / (name + ".gz")
        gz.write_bytes(gzip.compress((folder / name).read_bytes(), mtime=0))
        out[gz.name] = _md5(gz)
    return out


# ------------------------------------------------------------------ CIFAR (python pickles)
def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _flat(images_hwc: np.ndarray) -> np.ndarray:
    """``[N, 32, 32, 3]`` -> the files' row layout ``[N, 3072]`` (R plane, G plane, B plane)."""
    return np.ascontiguousarray(images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), 3072))


def write_fake_cifar10(root: PathLike, n_train: int = 250, n_test: int = 50, seed: int = 0) -> FakeFiles:
    """Write ``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``.

    The training images are split over the five batch files as evenly as possible.  The md5
    sums differ from torchvision's, so use :func:`patch_cifar_md5` before loading.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train_x, test_x = _images(rng, n_train, (32, 32, 3)), _images(rng, n_test, (32, 32, 3))
    train_y, test_y = _labels(rng, n_train, 10), _labels(rng, n_test, 10)
    chunks = np.array_split(np.arange(n_train), 5)
    for i, idx in enumerate(chunks, start=1):
        _pickle(
            folder / f"data_batch_{i}",
            {
                "batch_label": f"training batch {i} of 5",
                "labels": [int(v) for v in train_y[idx]],
                "data": _flat(train_x[idx]),
                "filenames": [f"fake_{j}.png" for j in idx],
            },
        )
    _pickle(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": [int(v) for v in test_y],
            "data": _flat(test_x),
            "filenames": [f"fake_test_{j}.png" for j in range(n_test)],
        },
    )
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": 10000, "num_vis": 3072})
    written = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    return FakeFiles(folder, {n: _md5(folder / n) for n in written}, train_y, test_y, train_x, test_x)


def write_fake_cifar100(root: PathLike, n_train: int = 200, n_test: int = 50, seed: int = 0) -> FakeFiles:
    """Write ``root/cifar-100-python/{train, test, meta}``; labels in the result are the fine labels.

    The coarse labels are written too (``fine // 5``), so a mix-up would be detected.  Use
    :func:`patch_cifar_md5` before loading.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    train_x, test_x = _images(rng, n_train, (32, 32, 3)), _images(rng, n_test, (32, 32, 3))
    train_y, test_y = _labels(rng, n_train, 100), _labels(rng, n_test, 100)
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        _pickle(
            folder / name,
            {
                "filenames": [f"fake_{name}_{j}.png" for j in range(len(y))],
                "batch_label": f"{name}ing batch 1 of 1",
                "fine_labels": [int(v) for v in y],
                "coarse_labels": [int(v) // 5 for v in y],
                "data": _flat(x),
            },
        )
    _pickle(
        folder / "meta",
        {
            "fine_label_names": [f"fine_{k}" for k in range(100)],
            "coarse_label_names": [f"coarse_{k}" for k in range(20)],
        },
    )
    written = ["train", "test", "meta"]
    return FakeFiles(folder, {n: _md5(folder / n) for n in written}, train_y, test_y, train_x, test_x)


def patch_cifar_md5(monkeypatch, cls, root: PathLike) -> Dict[str, str]:
    """Make torchvision accept the fake CIFAR files under ``root`` (for the test's duration).

    ``cls`` is ``torchvision.datasets.CIFAR10`` / ``CIFAR100`` or one of the data module
    classes (its ``dataset_cls`` is used).  Sets ``train_list``, ``test_list`` and ``meta``
    on that class (via ``monkeypatch``, so they are restored afterwards) to the md5 sums of
    the files now on disk; returns ``{file name: md5}``.
    """
    cls = getattr(cls, "dataset_cls", cls)
    folder = Path(root) / cls.base_folder

    def entries(lst: List[List[str]]) -> List[List[str]]:
        return [[name, _md5(folder / name)] for name, _ in lst]

    train_list, test_list = entries(cls.train_list), entries(cls.test_list)
    meta = dict(cls.meta, md5=_md5(folder / cls.meta["filename"]))
    monkeypatch.setattr(cls, "train_list", train_list)
    monkeypatch.setattr(cls, "test_list", test_list)
    monkeypatch.setattr(cls, "meta", meta)
    return {name: md5 for name, md5 in train_list + test_list} | {meta["filename"]: meta["md5"]}
