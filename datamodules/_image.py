"""Shared machinery of the image data modules (Fashion-MNIST, CIFAR-10, CIFAR-100)."""

from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset

#: Format of :meth:`ResumableDataLoader.state_dict` (raised when the layout changes).
LOADER_STATE_VERSION = 1


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


class ShardedRandomSampler(DistributedSampler):
    """One rank's share of the single-process shuffled order, batch by batch.

    Every rank draws the same order as the single-process training loader
    (``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))``), epoch
    after epoch, and rank ``r`` of ``W`` takes positions ``r, r + W, r + 2W, ...`` of it.
    Batched by ``global_batch / W`` per rank, step ``i`` of all ranks together covers
    positions ``[i·B, (i+1)·B)``: the union of the ranks' batches is the single process's
    batch ``i``. With ``drop_last`` the incomplete last global batch is dropped on every
    rank; without it the order is padded from its start to a multiple of ``W`` (like
    ``DistributedSampler``), so all ranks take the same number of steps.

    To reproduce the single-process order, the generator is consumed as that loader
    consumes it: one int64 draw (the workers' base seed) when an iterator is created,
    i.e. every epoch, or only the first with persistent workers, then ``RandomSampler``'s
    draws, lazily: ``RandomSampler`` draws a second permutation only when asked for more
    than ``n`` indices, and whether that happens depends on how far the consumer iterates
    (Lightning stops after ``len(loader)`` batches). This sampler pulls the global order
    just as far as the rank's requests need, and when asked beyond its share it pulls the
    rest, so the ranks' draws match the single process's request by request. (Checked
    against the real loader and real DDP runs in ``tests/test_ddp.py``.)

    A ``DistributedSampler`` subclass, so Lightning does not inject another one; ``set_epoch``
    is accepted and ignored (the generator advances by itself from epoch to epoch).
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int,
        rank: int,
        seed: int,
        global_batch: int,
        drop_last: bool,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.generator = torch.Generator().manual_seed(seed)
        self.order = RandomSampler(dataset, generator=self.generator)
        self.persistent_workers = persistent_workers
        self._iterations = 0
        n = len(dataset)  # type: ignore[arg-type]
        if drop_last:
            self.total_size = (n // global_batch) * global_batch
        else:
            self.total_size = -(-n // num_replicas) * num_replicas
        self.num_samples = self.total_size // num_replicas

    def __iter__(self):
        if not (self.persistent_workers and self._iterations > 0):
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # the DataLoader's base seed
        self._iterations += 1
        return self._share(iter(self.order))

    def _share(self, source):
        n, total, world, rank = len(self.order), self.total_size, self.num_replicas, self.rank
        head = []  # the first positions, repeated as padding (drop_last=False)
        for pos, index in enumerate(source):  # lazily: pulled only as far as requests reach
            if pos < total - n:
                head.append(index)
            if pos < total and pos % world == rank:
                yield index
        for pos in range(n, total):  # pad to a multiple of the world size, as DistributedSampler
            if pos % world == rank:
                yield head[(pos - n) % len(head)]

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict:
        """The pass counter (the generator's state is kept by :class:`ResumableSampler`)."""
        return {"iterations": self._iterations}

    def load_state_dict(self, state: dict) -> None:
        self._iterations = int(state["iterations"])


def _generator_after_one_draw(state: torch.Tensor) -> torch.Tensor:
    """The state a generator in ``state`` has after one int64 draw (a DataLoader's base seed)."""
    g = torch.Generator()
    g.set_state(state)
    torch.empty((), dtype=torch.int64).random_(generator=g)
    return g.get_state()


class ResumableSampler(DistributedSampler):
    """Wraps a sampler so that a pass can start part-way, with the generator state of that pass.

    :meth:`__iter__` records the shuffle generator's state when the pass begins (after the
    DataLoader's base-seed draw, just before the permutation is drawn); :meth:`resume_at`
    arranges that the *next* pass starts from a given generator state and skips the first
    ``skip`` indices (pulled from the wrapped sampler and dropped, no data is loaded), so it
    yields exactly what the interrupted pass would have yielded from there on.

    It is a pass-through (one replica) ``DistributedSampler`` so that Lightning never injects
    its own sampler under DDP; the wrapped sampler does any sharding (:class:`ShardedRandomSampler`)
    and receives ``set_epoch``. Used by :class:`ResumableDataLoader`.
    """

    def __init__(self, inner: Any, generator: Optional[torch.Generator] = None) -> None:
        super().__init__(range(len(inner)), num_replicas=1, rank=0, shuffle=False)
        self.inner = inner
        self.generator = generator
        self.pass_start_state: Optional[torch.Tensor] = None
        self.inner_start_state: Optional[dict] = None
        self.passes_started = 0
        self._resume: Optional[Tuple[Optional[torch.Tensor], Optional[dict], int]] = None

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def resume_at(self, generator_state: Optional[torch.Tensor], inner_state: Optional[dict], skip: int) -> None:
        """Start the next pass from ``generator_state`` (and the wrapped sampler's state), skipping ``skip`` indices."""
        self._resume = (generator_state, inner_state, int(skip))

    def __iter__(self):
        skip = 0
        if self._resume is not None:
            generator_state, inner_state, skip = self._resume
            self._resume = None
            if generator_state is not None and self.generator is not None:
                self.generator.set_state(generator_state)
            if inner_state is not None and hasattr(self.inner, "load_state_dict"):
                self.inner.load_state_dict(inner_state)
        self.pass_start_state = None if self.generator is None else self.generator.get_state()
        self.inner_start_state = self.inner.state_dict() if hasattr(self.inner, "state_dict") else None
        self.passes_started += 1
        source = iter(self.inner)
        for _ in range(skip):
            next(source, None)
        yield from source


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that Lightning can checkpoint and resume mid-epoch, bitwise.

    Lightning (2.x) stores ``state_dict()`` of every training loader that has
    ``state_dict``/``load_state_dict`` in the checkpoint's fit-loop state and calls
    ``load_state_dict`` before it creates the iterator of the resumed run. The state is the
    number of batches handed out in the current pass and the shuffle generator's state at
    the start of that pass (see :class:`ResumableSampler`): the resumed pass draws the same
    permutation and skips the batches already trained on, without loading them. A pass
    that was finished (``epoch_batches`` batches handed out, see below) resumes as the
    start of the next pass, with the generator state the uninterrupted run would have then.

    ``epoch_batches`` is the number of batches Lightning takes per epoch
    (``trainer.num_training_batches``, fewer than ``len(loader)`` with
    ``limit_train_batches``); :class:`lightning_msvag.fault_tolerance.ExactResume` sets it.
    Without it ``len(loader)`` is assumed.

    Exact with ``num_workers=0``. With worker processes the batches (order and skipping)
    are still exact, but random augmentation in the workers draws from worker seeds that a
    resumed run does not reproduce.
    """

    epoch_batches: Optional[int] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError("ResumableDataLoader needs a ResumableSampler as its sampler")
        self._batches_yielded = 0
        self._pass_index = 0  # the sampler pass the current iterator reads (0: no iterator yet)

    def __iter__(self):
        self._pass_index = self.sampler.passes_started + 1  # type: ignore[attr-defined]
        iterator = super().__iter__()  # now, as a DataLoader does: the base seed is drawn here
        self._batches_yielded = 0
        return self._counted(iterator)

    def _counted(self, iterator):
        for batch in iterator:
            self._batches_yielded += 1
            yield batch

    def _pass_length(self) -> int:
        length = len(self)
        return length if self.epoch_batches is None else min(length, int(self.epoch_batches))

    def state_dict(self) -> dict:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        # no iterator yet: resume like the start of the next pass
        finished = self._pass_index == 0 or self._batches_yielded >= self._pass_length()
        generator = sampler.generator
        if not finished and sampler.passes_started < self._pass_index:
            # an iterator exists (its base seed is drawn) but its pass has not drawn its order yet
            start = None if generator is None else generator.get_state()
            inner = sampler.inner.state_dict() if hasattr(sampler.inner, "state_dict") else None
            skip = 0
        elif finished:
            start = None if generator is None else generator.get_state()
            if start is not None and self.generator is generator and not (self.persistent_workers and self.num_workers):
                # the next pass's DataLoader iterator draws its base seed from this generator first
                start = _generator_after_one_draw(start)
            inner = sampler.inner.state_dict() if hasattr(sampler.inner, "state_dict") else None
            skip = 0
        else:
            start, inner = sampler.pass_start_state, sampler.inner_start_state
            skip = self._batches_yielded * (1 if self.batch_size is None else int(self.batch_size))
        return {
            "version": LOADER_STATE_VERSION,
            "batches_yielded": self._batches_yielded,
            "pass_finished": finished,
            "generator_state": None if start is None else start.clone(),
            "sampler_state": inner,
            "skip_indices": skip,
            "length": len(self),
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != LOADER_STATE_VERSION:
            raise ValueError(
                f"the checkpoint's data-loader state ({type(state).__name__}) is not a version-{LOADER_STATE_VERSION} "
                "ResumableDataLoader state; it was written by another version of lightning-msvag"
            )
        if state["length"] != len(self):
            raise ValueError(
                f"the checkpoint was written with a training loader of {state['length']} batches per epoch, this "
                f"run's has {len(self)}: batch size, data or number of processes differ, so it cannot resume in place"
            )
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        sampler.resume_at(state["generator_state"], state["sampler_state"], state["skip_indices"])


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

    def __init__(
        self,
        data_dir: str,
        batch_size: int,
        num_workers: int,
        seed: int,
        download: bool,
        pin_memory: bool,
        drop_last: bool,
    ) -> None:
        super().__init__()
        check_common_args(data_dir, batch_size, num_workers, seed, download)
        for name, value in (("pin_memory", pin_memory), ("drop_last", drop_last)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
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
    def prepare_data(self) -> None:
        """Check the files on disk; download the missing ones if ``download=True``.

        Raises :class:`~datamodules.DataUnavailableError` (files missing, download off or
        failed; the message lists the exact paths to place) or
        :class:`~datamodules.DataIntegrityError` (a present file has the wrong content).
        """
        self._ensure_files(download=self.download)

    def setup(self, stage: Optional[str] = None) -> None:
        """Load both splits into memory and build the train / train-eval / test data sets.

        Never downloads (that is :meth:`prepare_data`'s job); missing or broken files raise
        the same clear errors as :meth:`prepare_data` with ``download=False``.  Idempotent.
        """
        per_rank_batch_size(self.batch_size, distributed_shard(self.trainer)[1], type(self).__name__)
        if self.train_dataset is not None:
            return
        self._ensure_files(download=False)
        train_images, train_targets = self._load_split(train=True)
        test_images, test_targets = self._load_split(train=False)
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
