"""Shared machinery of the image data modules (Fashion-MNIST, CIFAR-10, CIFAR-100)."""

from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

# the resumable loader is a library tool; imported here for the image modules' training loaders
from lightning_msvag.resumable import ResumableDataLoader, ResumableSampler, ShardedRandomSampler

def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """Return ``value`` if it is an ``int`` (not a ``bool``) ``>= minimum``, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_common_args(data_dir: Any, batch_size: Any, num_workers: Any, seed: Any, download: Any) -> None:
    """Validate the constructor arguments every data module shares."""
    if not isinstance(data_dir, (str, Path)) or str(data_dir) == "":
        raise ValueError(f"data_dir must be a non-empty path string, got {data_dir!r}")
    check_positive_int("batch_size", batch_size, 1)
    check_positive_int("num_workers", num_workers, 0)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not isinstance(download, bool):
        raise ValueError(f"download must be True or False, got {download!r}")


def distributed_shard(trainer: Any) -> Tuple[int, int]:
    """``(global rank, world size)`` of the attached Lightning trainer; ``(0, 1)`` without one."""
    if trainer is None:
        return 0, 1
    return int(getattr(trainer, "global_rank", 0)), int(getattr(trainer, "world_size", 1))


def per_rank_batch_size(batch_size: int, world_size: int, what: str) -> int:
    """``batch_size // world_size``; ``ValueError`` unless ``world_size`` divides ``batch_size``."""
    if batch_size % world_size:
        raise ValueError(
            f"{what}: batch_size={batch_size} is the global batch (all processes together) and must be "
            f"divisible by the number of processes ({world_size}); choose a multiple of {world_size}."
        )
    return batch_size // world_size


class ArrayImageDataset(Dataset):
    """Images held in memory as uint8 (``[N, H, W]`` or ``[N, H, W, C]``) with integer labels.

    Item ``i`` is ``(transform(images[i]), int(targets[i]))``.  The arrays come from the
    torchvision data set classes (``.data`` / ``.targets``); skipping torchvision's per-item
    PIL conversion makes the pipeline several times faster and keeps it in plain tensors.
    """

    def __init__(self, images: Any, targets: Any, transform: Callable[[Any], torch.Tensor]) -> None:
        self.images = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
        if self.images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images, got {self.images.dtype}")
        self.targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
        if len(self.images) != len(self.targets):
            raise ValueError(f"{len(self.images)} images but {len(self.targets)} labels")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.targets[index])


class ImageDataModule(pl.LightningDataModule):
    """Base class: loaders, train-eval subset, argument checks.  Subclasses provide the files.

    Subclasses implement :meth:`_ensure_files` (check / download / verify what is on disk)
    and :meth:`_load_split` (return uint8 images and labels of one split), and set
    :attr:`num_classes`, :attr:`input_shape`, :meth:`_train_transform`, :meth:`_eval_transform`.

    **Several processes (DDP).** ``batch_size`` is the *global* batch, the problem's batch
    size (DeepOBS: 128) whatever the number of processes: each of the ``W`` ranks loads
    ``batch_size / W`` images per step (``W`` must divide ``batch_size``, checked in
    :meth:`setup`). The training loader then uses :class:`ShardedRandomSampler`: all ranks
    draw the single-process permutation (seeded by ``seed``) and step ``i`` of the ranks
    together covers exactly the single process's batch ``i``, so with gradients averaged
    by DDP the run matches one process up to float round-off (augmentation draws aside).
    The evaluation loaders get Lightning's ``DistributedSampler`` (no shuffling; it pads
    with a few repeated images when ``W`` does not divide the set's size).
    """

    #: Number of classes (set by subclasses).
    num_classes: int = 0
    #: Shape ``(C, H, W)`` of one input image.
    input_shape: Tuple[int, int, int] = (0, 0, 0)
    #: Meaning of ``dataloader_idx`` in ``validation_step``: 0 = train-eval, 1 = test.
    val_dataloader_names: Tuple[str, str] = ("train_eval", "test")
    #: ``(training, test)`` sizes of the real data set, and the shape of one stored uint8 image
    #: (what ``synthetic=True`` makes up in their place).
    split_sizes: Tuple[int, int] = (0, 0)
    stored_shape: Tuple[int, ...] = ()

    def __init__(
        self,
        data_dir: str,
        batch_size: int,
        num_workers: int,
        seed: int,
        download: bool,
        pin_memory: bool,
        drop_last: bool,
        synthetic: bool = False,
    ) -> None:
        super().__init__()
        check_common_args(data_dir, batch_size, num_workers, seed, download)
        for name, value in (("pin_memory", pin_memory), ("drop_last", drop_last), ("synthetic", synthetic)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        self.synthetic = synthetic
        self.data_dir = str(data_dir)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.download = download
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.train_dataset: Optional[Dataset] = None
        self.train_eval_dataset: Optional[Dataset] = None
        self.test_dataset: Optional[Dataset] = None

    # ----------------------------------------------------------------- subclass hooks
    def _ensure_files(self, download: bool) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _load_split(self, train: bool) -> Tuple[Any, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _train_transform(self) -> Callable[[Any], torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _eval_transform(self) -> Callable[[Any], torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    # ----------------------------------------------------------------- Lightning hooks
    def _synthetic_split(self, train: bool) -> Tuple[Any, Any]:
        """Random uint8 images of the stored shape and random labels, as many as the real split
        (seeded by ``seed``): the real pipeline (transforms, loaders) on made-up data."""
        n = self.split_sizes[0 if train else 1]
        generator = torch.Generator().manual_seed(self.seed * 2 + (0 if train else 1))
        images = torch.randint(0, 256, (n, *self.stored_shape), dtype=torch.uint8, generator=generator)
        return images, torch.randint(0, self.num_classes, (n,), generator=generator)

    def prepare_data(self) -> None:
        """Check the files on disk; download the missing ones if ``download=True``.

        Raises :class:`~lightning_msvag.datamodules.DataUnavailableError` (files missing, download off or
        failed; the message lists the exact paths to place) or
        :class:`~lightning_msvag.datamodules.DataIntegrityError` (a present file has the wrong content).
        """
        if not self.synthetic:
            self._ensure_files(download=self.download)

    def setup(self, stage: Optional[str] = None) -> None:
        """Load both splits into memory and build the train / train-eval / test data sets.

        Never downloads (that is :meth:`prepare_data`'s job); missing or broken files raise
        the same clear errors as :meth:`prepare_data` with ``download=False``.  Idempotent.
        """
        per_rank_batch_size(self.batch_size, distributed_shard(self.trainer)[1], type(self).__name__)
        if self.train_dataset is not None:
            return
        if self.synthetic:
            from pytorch_lightning.utilities import rank_zero_warn

            rank_zero_warn(f"{type(self).__name__}(synthetic=True): random images and labels of the real shapes and "
                           "sizes, to try a config or time it without the data; not for science")
            load = self._synthetic_split
        else:
            self._ensure_files(download=False)
            load = self._load_split
        train_images, train_targets = load(train=True)
        test_images, test_targets = load(train=False)
        n_train, n_test = len(train_targets), len(test_targets)
        if self.drop_last and n_train < self.batch_size:
            raise ValueError(
                f"batch_size={self.batch_size} is larger than the training set ({n_train} images) "
                "and drop_last=True: no training batch could be formed."
            )
        self.train_dataset = ArrayImageDataset(train_images, train_targets, self._train_transform())
        train_unaugmented = ArrayImageDataset(train_images, train_targets, self._eval_transform())
        # A fixed training-set portion of the test set's size: the first n_test training
        # images (the files are in random order), evaluated without augmentation.
        self.train_eval_dataset = Subset(train_unaugmented, range(min(n_test, n_train)))
        self.test_dataset = ArrayImageDataset(test_images, test_targets, self._eval_transform())

    # ----------------------------------------------------------------- loaders
    def _require_setup(self) -> None:
        if self.train_dataset is None:
            raise RuntimeError(
                f"{type(self).__name__}: call prepare_data() and setup() before asking for a data loader "
                "(a Lightning Trainer does this for you)."
            )

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool) -> DataLoader:
        rank, world = distributed_shard(self.trainer)
        batch_size = per_rank_batch_size(self.batch_size, world, type(self).__name__)
        # Every loader has its own generator, so creating an iterator (which draws the
        # workers' base seed) never touches torch's global RNG, which dropout and
        # augmentation use: validation does not shift the training randomness.
        generator = torch.Generator().manual_seed(self.seed)
        common = dict(
            batch_size=batch_size,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
        if not shuffle:
            return DataLoader(dataset, shuffle=False, generator=generator, **common)
        if world > 1:
            # our own rank-aware sampler: the global batch stays batch_size and the order
            # is the single-process one (Lightning leaves a DistributedSampler alone)
            order = ShardedRandomSampler(
                dataset, world, rank, self.seed, self.batch_size, drop_last, persistent_workers=self.num_workers > 0
            )
            sampler = ResumableSampler(order, order.generator)
        else:
            # exactly DataLoader(shuffle=True, generator=generator), resumable mid-epoch
            sampler = ResumableSampler(RandomSampler(dataset, generator=generator), generator)
        return ResumableDataLoader(dataset, sampler=sampler, generator=generator, **common)

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training batches ``(inputs, targets)``.

        The order comes from a ``torch.Generator`` seeded with ``seed`` and created anew on
        every call, so the sequence of epochs' permutations is reproducible and differs
        between seeds.  The remainder batch is dropped if ``drop_last`` (DeepOBS does).
        A :class:`ResumableDataLoader`: a Lightning checkpoint stores its position and the
        generator's state, and a resumed run continues the same permutation, mid-epoch too.
        Random augmentation draws from torch's global generator (seed it with
        ``pytorch_lightning.seed_everything``; worker processes are seeded by the loader).
        """
        self._require_setup()
        return self._loader(self.train_dataset, shuffle=True, drop_last=self.drop_last)

    def train_eval_dataloader(self) -> DataLoader:
        """The first ``len(test set)`` training images, unaugmented, in file order."""
        self._require_setup()
        return self._loader(self.train_eval_dataset, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        """The full test set, in file order, no remainder dropped."""
        self._require_setup()
        return self._loader(self.test_dataset, shuffle=False, drop_last=False)

    def val_dataloader(self) -> List[DataLoader]:
        """``[train_eval_dataloader(), test_dataloader()]``: dataloader_idx 0 = train-eval, 1 = test."""
        return [self.train_eval_dataloader(), self.test_dataloader()]


def format_paths(paths: Sequence[Path]) -> str:
    """One indented path per line."""
    return "\n".join(f"  {p}" for p in paths)
