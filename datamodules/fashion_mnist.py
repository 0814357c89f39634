"""Fashion-MNIST (docs/problems.md, P1 ``fmnist_2c2d``): 60k/10k, pixels / 255, no augmentation."""

import math
import struct
from pathlib import Path
from typing import Any, Callable, List, Tuple

import torch
from torchvision.datasets import FashionMNIST

from ._files import (
    DOWNLOAD_ERRORS,
    DataIntegrityError,
    DataUnavailableError,
    describe_exception,
    download_file,
    gunzip_file,
    verify_file,
)
from ._image import ImageDataModule, format_paths
from .transforms import fashion_mnist_transform

#: (file name, IDX magic number, shape of one item) of the four uncompressed files.
_IDX_FILES = (
    ("train-images-idx3-ubyte", 0x00000803, (28, 28)),
    ("train-labels-idx1-ubyte", 0x00000801, ()),
    ("t10k-images-idx3-ubyte", 0x00000803, (28, 28)),
    ("t10k-labels-idx1-ubyte", 0x00000801, ()),
)


def read_idx_header(path: Path, magic: int, item_shape: Tuple[int, ...]) -> int:
    """Check an uncompressed IDX file's header and size; return its number of items.

    Raises :class:`DataIntegrityError` naming the file when the magic number, the item
    shape or the file size (header + items) is wrong, e.g. for a truncated file.
    """
    size = path.stat().st_size
    ndim = 1 + len(item_shape)
    header_len = 4 * (1 + ndim)
    problem = None
    if size < header_len:
        problem = f"it has only {size} bytes, less than an IDX header ({header_len} bytes)"
    else:
        with open(path, "rb") as f:
            header = f.read(header_len)
        found_magic = struct.unpack(">I", header[:4])[0]
        dims = struct.unpack(f">{ndim}I", header[4:])
        if found_magic != magic:
            problem = (
                f"its magic number is 0x{found_magic:08x}, expected 0x{magic:08x} "
                "(is it still gzip-compressed, or not an IDX file?)"
            )
        elif tuple(dims[1:]) != tuple(item_shape):
            problem = f"its items have shape {tuple(dims[1:])}, expected {tuple(item_shape)}"
        else:
            expected = header_len + dims[0] * math.prod(item_shape)
            if size != expected:
                problem = (
                    f"its header announces {dims[0]:,} items, i.e. {expected:,} bytes, but the file has "
                    f"{size:,} bytes ({'TRUNCATED' if size < expected else 'trailing data'})"
                )
            else:
                return dims[0]
    raise DataIntegrityError(
        f"Fashion-MNIST file {path} is not a valid uncompressed IDX file: {problem}. "
        "The file was left untouched; replace it (or delete it and use download=True)."
    )


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST for the DeepOBS problem ``fmnist_2c2d`` (docs/problems.md, P1).

    Batches are ``(inputs, targets)`` with inputs float32 ``[B, 1, 28, 28]`` = pixels / 255
    (exactly ``torchvision.transforms.ToTensor``), no augmentation, and int64 labels in
    ``[0, 10)``.  Loaders: :meth:`train_dataloader` (shuffled, seeded),
    :meth:`train_eval_dataloader` (first 10,000 training images), :meth:`test_dataloader`
    (all 10,000 test images), :meth:`val_dataloader` (``[train_eval, test]``).

    On disk (torchvision's layout), uncompressed IDX files::

        <data_dir>/FashionMNIST/raw/train-images-idx3-ubyte
        <data_dir>/FashionMNIST/raw/train-labels-idx1-ubyte
        <data_dir>/FashionMNIST/raw/t10k-images-idx3-ubyte
        <data_dir>/FashionMNIST/raw/t10k-labels-idx1-ubyte

    The ``.gz`` archives under the same names plus ``.gz`` are accepted too (checked
    against torchvision's md5 and unpacked beside them, no network needed).

    Args:
        data_dir: Root data folder (the ``FashionMNIST/raw`` folder lives inside it).
        batch_size: Mini-batch size of all loaders (DeepOBS: 128); under DDP the global batch,
            split evenly across the processes.
        num_workers: ``DataLoader`` worker processes (0 = load in the main process).
        seed: Seed of the training loader's shuffling generator.
        download: Download missing files in :meth:`prepare_data` (never over present files).
        pin_memory: Passed to the data loaders.
        drop_last: Drop the last incomplete training batch (DeepOBS does; 60000 = 468*128 + 96).
        synthetic: Random images and labels of Fashion-MNIST's shapes and sizes instead of the files
            (nothing read or downloaded): to try the config, or time it, without the data. Not for
            science.
    """

    num_classes = 10
    input_shape = (1, 28, 28)
    split_sizes = (60_000, 10_000)
    stored_shape = (28, 28)

    def __init__(
        self,
        data_dir: str = "./data",
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 42,
        download: bool = True,
        pin_memory: bool = False,
        drop_last: bool = True,
        synthetic: bool = False,
    ) -> None:
        super().__init__(data_dir, batch_size, num_workers, seed, download, pin_memory, drop_last, synthetic)
        self.save_hyperparameters()

    @property
    def raw_folder(self) -> Path:
        """``<data_dir>/FashionMNIST/raw``, where torchvision looks for the files."""
        return Path(self.data_dir) / "FashionMNIST" / "raw"

    def _instructions(self) -> str:
        names = [name for name, _, _ in _IDX_FILES]
        return (
            f"Place the four uncompressed Fashion-MNIST IDX files in {self.raw_folder}:\n"
            + format_paths([self.raw_folder / n for n in names])
            + "\n(or the .gz archives from https://github.com/zalandoresearch/fashion-mnist under the "
            "same names plus '.gz' in the same folder), then run again. Without access to the mirrors: "
            "docs/fashion_mnist_offline.md (python -m lightning_msvag.datamodules.fashion_mnist_offline builds them from "
            "the Debian package dataset-fashion-mnist)."
        )

    def _ensure_files(self, download: bool) -> None:
        raw = self.raw_folder
        resources: List[Tuple[str, str]] = list(FashionMNIST.resources)
        missing = []
        for gz_name, gz_md5 in resources:
            target = raw / gz_name[: -len(".gz")]
            if target.is_file():
                continue
            archive = raw / gz_name
            if not archive.is_file():
                if not download:
                    missing.append(target)
                    continue
                self._download_archive(gz_name, gz_md5, archive)  # verified before it is renamed
            else:
                verify_file(archive, "md5", gz_md5, what="Fashion-MNIST archive")
            try:
                gunzip_file(archive, target)
            except DOWNLOAD_ERRORS as exc:
                raise DataIntegrityError(
                    f"Could not unpack {archive} ({describe_exception(exc)}).\n" + self._instructions()
                ) from None
        if missing:
            raise DataUnavailableError(
                "Fashion-MNIST files not found (download=False):\n"
                + format_paths(missing)
                + "\n"
                + self._instructions()
                + "\nOr pass download=True."
            )
        counts = {name: read_idx_header(raw / name, magic, shape) for name, magic, shape in _IDX_FILES}
        for split in ("train", "t10k"):
            n_img, n_lab = counts[f"{split}-images-idx3-ubyte"], counts[f"{split}-labels-idx1-ubyte"]
            if n_img != n_lab:
                raise DataIntegrityError(
                    f"Fashion-MNIST {split} files disagree: {raw / f'{split}-images-idx3-ubyte'} holds {n_img:,} "
                    f"images but {raw / f'{split}-labels-idx1-ubyte'} holds {n_lab:,} labels."
                )

    def _download_archive(self, gz_name: str, gz_md5: str, archive: Path) -> None:
        errors = []
        for mirror in FashionMNIST.mirrors:
            url = f"{mirror}{gz_name}"
            try:
                download_file(url, archive, "md5", gz_md5)
                return
            except DOWNLOAD_ERRORS as exc:
                errors.append(f"  {url}: {describe_exception(exc)}")
            except DataIntegrityError as exc:
                errors.append(f"  {url}: {exc}")
        raise DataUnavailableError(
            f"Could not download Fashion-MNIST file {gz_name} (no network?).\n"
            + "\n".join(errors)
            + "\n"
            + self._instructions()
        )

    def _load_split(self, train: bool) -> Tuple[Any, Any]:
        try:
            ds = FashionMNIST(self.data_dir, train=train, download=False)
        except (RuntimeError, OSError, ValueError, TypeError, AssertionError) as exc:
            raise DataIntegrityError(
                f"torchvision could not read Fashion-MNIST from {self.raw_folder} ({describe_exception(exc)}).\n"
                + self._instructions()
            ) from None
        return ds.data, ds.targets

    def _train_transform(self) -> Callable[[Any], torch.Tensor]:
        return fashion_mnist_transform()

    def _eval_transform(self) -> Callable[[Any], torch.Tensor]:
        return fashion_mnist_transform()


__all__ = ["FashionMNISTDataModule", "read_idx_header"]
