"""CIFAR-10 and CIFAR-100 (docs/problems.md, P2 ``cifar10_3c3d`` and P3 ``cifar100_wrn404``)."""

from pathlib import Path
from typing import Any, Callable, List, Tuple, Type

import torch
from torchvision.datasets import CIFAR10, CIFAR100

from ._files import (
    DOWNLOAD_ERRORS,
    DataIntegrityError,
    DataUnavailableError,
    describe_exception,
    download_file,
    extract_tar_members,
    file_digest,
    verify_file,
)
from ._image import ImageDataModule, format_paths
from .transforms import cifar_eval_transform, cifar_train_transform


class _CIFARDataModule(ImageDataModule):
    """Common code of the two CIFAR modules; ``dataset_cls`` is the torchvision class."""

    dataset_cls: Type[CIFAR10] = CIFAR10
    num_classes = 10
    input_shape = (3, 32, 32)
    split_sizes = (50_000, 10_000)
    stored_shape = (32, 32, 3)

    def __init__(
        self,
        data_dir: str = "./data",
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 42,
        download: bool = True,
        pin_memory: bool = False,
        drop_last: bool = True,
        augment: bool = True,
        pixel_range: float = 1.0,
        synthetic: bool = False,
    ) -> None:
        super().__init__(data_dir, batch_size, num_workers, seed, download, pin_memory, drop_last, synthetic)
        if not isinstance(augment, bool):
            raise ValueError(f"augment must be True or False, got {augment!r}")
        if isinstance(pixel_range, bool) or not isinstance(pixel_range, (int, float)) or not pixel_range > 0:
            raise ValueError(f"pixel_range must be a positive number (1.0 or 255.0), got {pixel_range!r}")
        self.augment = augment
        self.pixel_range = float(pixel_range)
        self.save_hyperparameters()

    # --------------------------------------------------------------------- files
    @property
    def base_folder(self) -> Path:
        """The folder torchvision reads, e.g. ``<data_dir>/cifar-10-batches-py``."""
        return Path(self.data_dir) / self.dataset_cls.base_folder

    def expected_files(self) -> List[Tuple[Path, str]]:
        """``(path, md5)`` of every file torchvision checks, read from the torchvision class now.

        (Tests that write small fake files patch the class' ``train_list`` / ``test_list`` /
        ``meta`` md5 entries; this method sees the patched values.)
        """
        cls = self.dataset_cls
        entries = [(name, md5) for name, md5 in list(cls.train_list) + list(cls.test_list)]
        entries.append((cls.meta["filename"], cls.meta["md5"]))
        return [(self.base_folder / name, md5) for name, md5 in entries]

    def _instructions(self) -> str:
        cls = self.dataset_cls
        return (
            f"Place the python-version {self._title} files in {self.base_folder}:\n"
            + format_paths([p for p, _ in self.expected_files()])
            + f"\n(or the archive {cls.url} as {Path(self.data_dir) / cls.filename}; "
            "it is unpacked there), then run again."
        )

    @property
    def _title(self) -> str:
        return "CIFAR-100" if issubclass(self.dataset_cls, CIFAR100) else "CIFAR-10"

    def _verify_present(self, files: List[Tuple[Path, str]]) -> None:
        bad = []
        for path, md5 in files:
            if path.is_file():
                actual = file_digest(path, "md5")
                if actual != md5:
                    bad.append(f"  {path} ({path.stat().st_size:,} bytes): expected md5 {md5}, actual md5 {actual}")
        if bad:
            raise DataIntegrityError(
                f"{self._title} file(s) present but with the wrong md5 checksum (torchvision checks these "
                "even with download=False):\n"
                + "\n".join(bad)
                + "\nThe files were left untouched. Replace them with the original python-version files "
                "(or delete them and use download=True)."
            )

    def _ensure_files(self, download: bool) -> None:
        files = self.expected_files()
        self._verify_present(files)
        missing = [p for p, _ in files if not p.is_file()]
        if not missing:
            return
        cls = self.dataset_cls
        archive = Path(self.data_dir) / cls.filename
        if not archive.is_file():
            if not download:
                raise DataUnavailableError(
                    f"{self._title} files not found (download=False):\n"
                    + format_paths(missing)
                    + "\n"
                    + self._instructions()
                    + "\nOr pass download=True."
                )
            try:
                download_file(cls.url, archive, "md5", cls.tgz_md5)  # verified before it is renamed
            except DOWNLOAD_ERRORS as exc:
                raise DataUnavailableError(
                    f"Could not download {self._title} from {cls.url} ({describe_exception(exc)}; no network?).\n"
                    + self._instructions()
                ) from None
        else:
            verify_file(archive, "md5", cls.tgz_md5, what=f"{self._title} archive")
        # unpack only the missing files, each atomically; present files are never touched
        members = {f"{cls.base_folder}/{p.name}": p for p in missing}
        try:
            absent = extract_tar_members(archive, members)
        except DOWNLOAD_ERRORS as exc:
            raise DataIntegrityError(
                f"Could not unpack {archive} ({describe_exception(exc)}).\n" + self._instructions()
            ) from None
        if absent:
            raise DataIntegrityError(
                f"{archive} does not contain: {', '.join(absent)}.\n" + self._instructions()
            )
        self._verify_present(files)

    def _load_split(self, train: bool) -> Tuple[Any, Any]:
        try:
            ds = self.dataset_cls(self.data_dir, train=train, download=False)
        except (RuntimeError, OSError, ValueError, KeyError, EOFError, TypeError) as exc:
            # e.g. a file changed between the check and the load: report with the full diagnosis
            self._verify_present(self.expected_files())
            raise DataIntegrityError(
                f"torchvision could not read {self._title} from {self.base_folder} ({describe_exception(exc)}).\n"
                + self._instructions()
            ) from None
        return ds.data, ds.targets  # uint8 [N, 32, 32, 3]; fine labels for CIFAR-100

    def _train_transform(self) -> Callable[[Any], torch.Tensor]:
        if self.augment:
            return cifar_train_transform(self.pixel_range)
        return cifar_eval_transform(self.pixel_range)

    def _eval_transform(self) -> Callable[[Any], torch.Tensor]:
        return cifar_eval_transform(self.pixel_range)




class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 for the DeepOBS problem ``cifar10_3c3d`` (docs/problems.md, P2).

    Batches are ``(inputs, targets)``: inputs float32 ``[B, 3, 32, 32]``, labels int64 in
    ``[0, 10)``.  Training images: zero-pad 2, random 32x32 crop, random horizontal flip,
    additive brightness ±63/255, saturation x[0.5, 1.5], contrast x[0.2, 1.8] (TensorFlow
    semantics, no clipping), per-image standardisation (see :mod:`lightning_msvag.datamodules.transforms`).
    Train-eval (first 10,000 training images) and test (all 10,000): per-image
    standardisation only.  :meth:`val_dataloader` returns ``[train_eval, test]``.

    On disk (torchvision's layout, the "python version" pickles)::

        <data_dir>/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch, batches.meta

    torchvision checks their md5 sums even with ``download=False``; a mismatch is reported
    with the file name and both checksums.

    Args:
        data_dir: Root data folder (the torchvision folder lives inside it).
        batch_size: Mini-batch size of all loaders (DeepOBS: 128); under DDP the global batch,
            split evenly across the processes.
        num_workers: ``DataLoader`` worker processes (0 = load in the main process).
        seed: Seed of the training loader's shuffling generator.
        download: Download the archive in :meth:`prepare_data` if files are missing (never
            over present files; a present file with a wrong md5 is an error).
        pin_memory: Passed to the data loaders.
        drop_last: Drop the last incomplete training batch (DeepOBS does; 50000 = 390*128 + 80).
        augment: Apply the training augmentation (docs/problems.md); ``False`` gives the test-time
            preprocessing for training batches too.
        pixel_range: Float scale of the pixels before augmentation: 1.0 maps them to
            ``[0, 1]`` (brightness jitter up to ±63/255 of the range); 255.0 keeps
            ``[0, 255]`` exactly like DeepOBS' TensorFlow code (where the ±63/255 brightness
            jitter is negligible).  Outputs are standardised per image either way.  See
            :mod:`lightning_msvag.datamodules.transforms`.
        synthetic: Random images and labels of the data set's shapes and sizes instead of the
            files (nothing read or downloaded): to try the config, or time it, without the data.
            Not for science.
    """

    dataset_cls = CIFAR10
    num_classes = 10


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (fine labels) for the DeepOBS problem ``cifar100_wrn404`` (docs/problems.md, P3).

    Same preprocessing and augmentation as :class:`CIFAR10DataModule`; labels are the 100
    fine labels, int64 in ``[0, 100)``.

    On disk (torchvision's layout, the "python version" pickles)::

        <data_dir>/cifar-100-python/train, test, meta

    torchvision checks their md5 sums even with ``download=False``; a mismatch is reported
    with the file name and both checksums.

    Args:
        data_dir: Root data folder (the torchvision folder lives inside it).
        batch_size: Mini-batch size of all loaders (DeepOBS: 128); under DDP the global batch,
            split evenly across the processes.
        num_workers: ``DataLoader`` worker processes (0 = load in the main process).
        seed: Seed of the training loader's shuffling generator.
        download: Download the archive in :meth:`prepare_data` if files are missing (never
            over present files; a present file with a wrong md5 is an error).
        pin_memory: Passed to the data loaders.
        drop_last: Drop the last incomplete training batch (DeepOBS does; 50000 = 390*128 + 80).
        augment: Apply the training augmentation (docs/problems.md); ``False`` gives the test-time
            preprocessing for training batches too.
        pixel_range: Float scale of the pixels before augmentation: 1.0 maps them to
            ``[0, 1]`` (brightness jitter up to ±63/255 of the range); 255.0 keeps
            ``[0, 255]`` exactly like DeepOBS' TensorFlow code (where the ±63/255 brightness
            jitter is negligible).  Outputs are standardised per image either way.  See
            :mod:`lightning_msvag.datamodules.transforms`.
        synthetic: Random images and labels of the data set's shapes and sizes instead of the
            files (nothing read or downloaded): to try the config, or time it, without the data.
            Not for science.
    """

    dataset_cls = CIFAR100
    num_classes = 100
