"""Data loaders that a Lightning checkpoint can resume mid-epoch, bitwise (docs/long_runs.md).

A general tool, not tied to the paper's problems: any ``Dataset`` can be loaded with

    generator = torch.Generator().manual_seed(seed)
    sampler = ResumableSampler(RandomSampler(dataset, generator=generator), generator)
    loader = ResumableDataLoader(dataset, batch_size=..., sampler=sampler, generator=generator)

which draws exactly what ``DataLoader(dataset, shuffle=True, generator=generator)`` draws,
and whose ``state_dict`` Lightning stores in every checkpoint (the fit loop's state), so a
run resumed from it continues with the batches the uninterrupted run would have seen.
:class:`ShardedRandomSampler` shards that single-process order over DDP ranks batch by batch.
:class:`lightning_msvag.fault_tolerance.ExactResume` completes the picture (RNG states, the
epoch length under ``limit_train_batches``).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

__all__ = ["LOADER_STATE_VERSION", "ResumableDataLoader", "ResumableSampler", "ShardedRandomSampler"]

#: Format of :meth:`ResumableDataLoader.state_dict` (raised when the layout changes).
LOADER_STATE_VERSION = 1


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
        self._batches_before_resume = 0  # batches of a resumed pass handed out before the checkpoint
        self._loaded_state: Optional[dict] = None  # a loaded state no iterator has taken up yet

    def __iter__(self):
        self._pass_index = self.sampler.passes_started + 1  # type: ignore[attr-defined]
        iterator = super().__iter__()  # now, as a DataLoader does: the base seed is drawn here
        # a resumed pass counts the batches its checkpoint had handed out, so that a second
        # checkpoint in the same pass skips those too
        self._batches_yielded, self._batches_before_resume = self._batches_before_resume, 0
        self._loaded_state = None
        return self._counted(iterator)

    def _counted(self, iterator):
        for batch in iterator:
            self._batches_yielded += 1
            yield batch

    def _pass_length(self) -> int:
        length = len(self)
        return length if self.epoch_batches is None else min(length, int(self.epoch_batches))

    def state_dict(self) -> dict:
        if self._loaded_state is not None:  # loaded, not yet resumed: the same position still
            return {k: v.clone() if torch.is_tensor(v) else v for k, v in self._loaded_state.items()}
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
        self._batches_before_resume = 0 if state["pass_finished"] else int(state["batches_yielded"])
        self._loaded_state = dict(state)
