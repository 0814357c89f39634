"""Long runs a researcher can trust: exact resume, pre-emption, checkpoint checks (docs/long_runs.md).

Three Lightning callbacks, added by the ``lightning-msvag`` command by default
(:func:`fault_tolerance_callbacks`):

* :class:`ExactResume` stores every process's RNG states (torch CPU and CUDA, numpy,
  python) in each checkpoint (its callback state) and restores them when a fit resumes, just
  before the first training batch; it also tells the
  :class:`~lightning_msvag.resumable.ResumableDataLoader` how many batches an epoch has, so
  the checkpoint records where in the epoch the run is.
  Together with the loaders' state (which Lightning stores itself) and the char-LSTM's
  carried state, ``N steps + resume + M steps`` equals ``N + M`` steps straight, bitwise on CPU.
* :class:`PreemptionCheckpoint`: on SIGTERM (a cluster pre-empting the job) or the SLURM
  requeue signal (SIGUSR1 by default), finish the current step, write ``last.ckpt`` into the
  checkpoint folder, requeue the SLURM job (requeue signal under SLURM only) and exit with
  status ``128 + signal`` (143 for SIGTERM) instead of 0.
* :class:`CheckpointGuard`: before a checkpoint is loaded, check the archive's CRCs, that
  parameters and optimizer state are finite and that shapes match the model; a bad file
  raises :class:`CheckpointError` (a ``ValueError``: the command prints one line, exits 1)
  before anything trains. It refuses to *write* a checkpoint whose parameters or optimizer
  state are non-finite (:class:`NonFiniteTrainingError`), which ends the run, and records the
  optimizers' classes in each checkpoint (:func:`checkpoint_optimizer_classes`), so that a
  resume with another optimizer is refused before it starts.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.plugins.io import CheckpointIO

from .resumable import ResumableDataLoader

__all__ = [
    "CheckpointError",
    "CheckpointGuard",
    "ExactResume",
    "NonFiniteTrainingError",
    "Preempted",
    "PreemptionCheckpoint",
    "check_checkpoint_contents",
    "checkpoint_optimizer_classes",
    "checkpoint_hyperparameters",
    "checkpoint_optimizer_settings",
    "fault_tolerance_callbacks",
    "rng_state",
    "set_rng_state",
    "verify_checkpoint_archive",
]

# ============================================================================ RNG states
def rng_state() -> Dict[str, Any]:
    """This process's RNG states, as tensors and plain numbers (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss": py_gauss},
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _all_gather_objects(obj: Any) -> List[Any]:
    """``obj`` of every process of the default process group (the one DDP trains in), rank order."""
    if (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        gathered: List[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def _resumable_loaders(trainer: Trainer) -> Iterator[ResumableDataLoader]:
    """The trainer's training loaders (one, or a list / dict of them) that are resumable."""
    pending = [trainer.train_dataloader]
    while pending:
        item = pending.pop()
        if isinstance(item, ResumableDataLoader):
            yield item
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)


_LEGACY_RNG_KEY = "lightning_msvag_rng_states"


def epoch_cut_short_counted_unfinished(checkpoint: Dict[str, Any]) -> bool:
    """Rewrite the loop counts of a checkpoint written when a fit ended; return whether it was one.

    When ``max_steps`` stops a fit, Lightning finishes the epoch it is in (end-of-epoch hooks,
    the epoch counted processed and completed) and ``ModelCheckpoint`` writes ``last.ckpt`` from
    ``on_train_end``. Lightning's restore does not expect those counts: inside an epoch, the rest
    of the epoch's batches would run as the next epoch; at an epoch's last batch, one epoch
    number and one logging step would be skipped. The counts are set to those of the checkpoint
    written at the ``on_train_batch_end`` of the same batch, which Lightning restores as the
    uninterrupted run goes on (tests/test_resume.py).
    """
    loops = checkpoint.get("loops")
    fit_loop = loops.get("fit_loop") if isinstance(loops, dict) else None
    if not isinstance(fit_loop, dict):
        return False
    batches = fit_loop.get("epoch_loop.batch_progress") or {}
    epochs = fit_loop.get("epoch_progress") or {}
    stepped = fit_loop.get("epoch_loop.state_dict") or {}
    if not all(isinstance(c, dict) for c in (batches.get("current"), batches.get("total"),
                                             epochs.get("current"), epochs.get("total"))):
        return False
    ended = all(len({c["ready"], c["started"], c["processed"], c["completed"]}) == 1
                for c in (batches["current"], batches["total"], epochs["current"], epochs["total"]))
    if not ended or batches["current"]["completed"] == 0 or epochs["current"]["ready"] == 0:
        return False
    for counts in (epochs["current"], epochs["total"]):
        counts["processed"] = counts["completed"] = counts["ready"] - 1
    for counts in (batches["current"], batches["total"]):
        counts["completed"] -= 1
    if "_batches_that_stepped" in stepped:
        stepped["_batches_that_stepped"] -= 1
    checkpoint["epoch"] = epochs["current"]["completed"]
    return True


class ExactResume(Callback):
    """Store each process's RNG states in checkpoints; restore them when a fit resumes.

    The callback's state (``state_dict``, which Lightning stores under
    ``checkpoint["callbacks"]["ExactResume"]`` like ``EarlyStopping``'s) is
    ``{"world_size": W, "ranks": [one entry per process]}`` (rank order, gathered under
    DDP). Lightning hands it back through ``load_state_dict`` while it restores the
    checkpoint, before the sanity check; setting the RNG states then would let the sanity
    check and the loader setup draw from them. So it is only kept there, and each rank takes
    its own entry back in ``on_train_start``, i.e. after the sanity check and after the
    training loader's iterator exists, just before the first batch is fetched (CPU
    augmentation draws at fetch time), so the resumed run draws the same dropout masks and
    augmentations as the uninterrupted one. A checkpoint written with another number of
    processes restores nothing (with a warning).

    It also sets ``epoch_batches`` (= ``trainer.num_training_batches``) on the project's
    resumable training loaders, so that a checkpoint at the end of an epoch shortened by
    ``limit_train_batches`` resumes with the next epoch.

    And it keeps the epoch count of a fit stopped by ``max_steps`` inside an epoch: Lightning
    runs its end-of-epoch steps then and records the epoch as finished, so a checkpoint written
    at that stop (``last.ckpt``) would resume the rest of the epoch's batches as the next epoch,
    one epoch ahead of the data: ``current_epoch`` and the logged ``epoch`` off by one and a
    ``max_epochs`` run one epoch short. Such a checkpoint is written (and, when an earlier one is
    loaded, read) as the mid-epoch checkpoint it is (:func:`epoch_cut_short_counted_unfinished`).
    Resumed from a checkpoint of an epoch's last batch, the next epoch starts as an epoch does
    (counted, with its ``on_train_epoch_start`` hooks), which Lightning alone skips.
    """

    def __init__(self) -> None:
        self._pending: Optional[Dict[str, Any]] = None

    def state_dict(self) -> Dict[str, Any]:
        # called on every process while a checkpoint is assembled, so under DDP all ranks
        # take part in the gather; tensors and plain values only (weights_only=True loads it)
        states = _all_gather_objects(rng_state())
        return {"world_size": len(states), "ranks": states}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._pending = state_dict

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: Dict[str, Any]) -> None:
        epoch_cut_short_counted_unfinished(checkpoint)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: Dict[str, Any]) -> None:
        # Lightning restores the loops from this same dictionary after the callbacks' hooks
        epoch_cut_short_counted_unfinished(checkpoint)
        # checkpoints of version 0.1.0 kept the states under a top-level key of their own
        # (a checkpoint holds either that key or the callback state, never both)
        if _LEGACY_RNG_KEY in checkpoint:
            self._pending = checkpoint[_LEGACY_RNG_KEY]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for loader in _resumable_loaders(trainer):
            loader.epoch_batches = trainer.num_training_batches
        fit_loop = trainer.fit_loop
        if fit_loop.restarted_mid_epoch and fit_loop.epoch_progress.current.processed == fit_loop.epoch_progress.current.ready:
            # a checkpoint of an epoch's last batch: Lightning has just finished that epoch, yet
            # would start the next one as if resuming inside it, without counting it ready and
            # started and without the on_train_epoch_start hooks (progress bar, schedules, the
            # user's hooks); counts that lag then mislead every later restore
            fit_loop.reset_restart_stage()
        saved, self._pending = self._pending, None
        if saved is None:
            return
        if saved["world_size"] != trainer.world_size:
            from pytorch_lightning.utilities import rank_zero_warn

            rank_zero_warn(
                f"the checkpoint holds the RNG states of {saved['world_size']} processes, this run has "
                f"{trainer.world_size}: not restoring them (dropout/augmentation draws will differ from an "
                "uninterrupted run)"
            )
            return
        set_rng_state(saved["ranks"][trainer.global_rank])


class ResumedEpochProgressBar(TQDMProgressBar):
    """Lightning's progress bar, which also shows the epoch's name and length in a fit resumed inside an epoch.

    Lightning does not call ``on_train_epoch_start`` for the epoch it resumes inside (the epoch
    had started before the checkpoint), so its bar shows ``Training: 19/?``; this one shows
    ``Epoch 3: 19/1045`` as the uninterrupted run did at that batch.
    """

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.fit_loop.restarted_mid_epoch:
            self.on_train_epoch_start(trainer, pl_module)
            self.train_progress_bar.n = trainer.fit_loop.epoch_loop.batch_progress.current.ready
            self.train_progress_bar.refresh()


# ============================================================================ checkpoint checks
class CheckpointError(ValueError):
    """A checkpoint file that is damaged or does not fit the model; reported in one line."""


class NonFiniteTrainingError(ValueError):
    """Training produced non-finite parameters or optimizer state; no checkpoint of it is written."""


def verify_checkpoint_archive(path: "str | os.PathLike") -> None:
    """Check that ``path`` is a readable torch zip archive whose every member matches its CRC-32.

    ``torch.load`` does not verify the CRCs, so a file with flipped bytes can load and fill
    the model or optimizer with garbage. Raises :class:`CheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:  # also zlib/struct errors surface here
        raise CheckpointError(
            f"checkpoint {path} is damaged: not a readable torch archive ({type(exc).__name__}: {exc}); "
            "resume from an earlier checkpoint"
        ) from None
    except Exception as exc:  # zlib.error etc.
        raise CheckpointError(f"checkpoint {path} is damaged ({type(exc).__name__}: {exc}); "
                              "resume from an earlier checkpoint") from None
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {path} is damaged: member {bad!r} fails its CRC-32 check (the file was changed after "
            "it was written, e.g. a partial copy or disk error); resume from an earlier checkpoint"
        )


def _tensors(obj: Any, prefix: str) -> Iterator[Tuple[str, torch.Tensor]]:
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{prefix}[{i}]")


def _first_few(names: List[str]) -> str:
    """At most four names, then how many more: for one-line messages."""
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def nonfinite_entries(checkpoint: Dict[str, Any]) -> List[str]:
    """Names of the floating tensors of ``state_dict`` and ``optimizer_states`` that hold NaN or ±inf."""
    bad = []
    for section in ("state_dict", "optimizer_states"):
        for name, tensor in _tensors(checkpoint.get(section), section):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad.append(name)
    return bad


def check_checkpoint_contents(checkpoint: Dict[str, Any], module: Optional[torch.nn.Module], source: str) -> None:
    """Refuse a loaded checkpoint that is not finite or whose parameters do not fit ``module``.

    Checks that ``state_dict`` exists, every floating tensor of ``state_dict`` and
    ``optimizer_states`` is finite, and (given ``module``) that keys and shapes equal the
    model's. Raises :class:`CheckpointError` naming the first problems.
    """
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {source} holds no model state_dict; it is not a Lightning checkpoint")
    bad = nonfinite_entries(checkpoint)
    if bad:
        raise CheckpointError(
            f"checkpoint {source} holds non-finite values (NaN/inf) in {_first_few(bad)}; resuming from it cannot train. "
            "Resume from an earlier checkpoint"
        )
    if module is None:
        return
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v)}
    problems = [f"{k}: checkpoint {found[k]} vs model {expected[k]}" for k in expected if k in found and found[k] != expected[k]]
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:3])}" + (" ..." if len(unexpected) > 3 else ""))
    if problems:
        raise CheckpointError(
            f"checkpoint {source} does not fit the model {type(module).__name__}: {'; '.join(problems[:4])} "
            "(another model or model settings than this run's)"
        )


#: Top-level checkpoint key holding the import paths of the optimizers whose state it holds.
OPTIMIZER_CLASSES_KEY = "lightning_msvag_optimizer_classes"


def checkpoint_optimizer_classes(path: "str | os.PathLike") -> List[str]:
    """Import paths of the optimizers whose state the checkpoint at ``path`` holds.

    Read from what :class:`CheckpointGuard` records; for older checkpoints from the run's
    ``config.yaml`` (LightningCLI's saved config, ``<version folder>/config.yaml`` beside the
    ``checkpoints`` folder). ``[]`` when neither says.
    """
    path = Path(path)
    recorded = _read_checkpoint(path).get(OPTIMIZER_CLASSES_KEY)
    if recorded:
        return [str(c) for c in recorded]
    config = path.resolve().parent.parent / "config.yaml"
    if path.resolve().parent.name == "checkpoints" and config.is_file():
        import yaml

        try:
            optimizer = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("optimizer")
        except (OSError, yaml.YAMLError, AttributeError):
            return []
        class_path = optimizer.get("class_path") if isinstance(optimizer, dict) else optimizer
        return [str(class_path)] if class_path else []
    return []


#: The family's hyperparameters that decide what its buffers hold (docs/algorithm.md §1.1–1.2).
RULE_SETTINGS = {"variance": "moving_average", "factor": "erf"}


def checkpoint_optimizer_settings(path: "str | os.PathLike") -> List[Dict[str, Any]]:
    """The ``variance``/``factor`` recorded in each optimizer state of the checkpoint at ``path``
    (its first param group's; a state of 0.1.0 kept ``variance`` at the top level), only the
    keys a state has; ``[]`` if unreadable."""
    states = _read_checkpoint(Path(path)).get("optimizer_states")
    found = []
    for state in states or []:
        settings: Dict[str, Any] = {}
        if isinstance(state, dict):
            groups = state.get("param_groups") or [{}]
            first = groups[0] if isinstance(groups[0], dict) else {}
            for key in RULE_SETTINGS:
                value = first.get(key, state.get(key))
                if value is not None:
                    settings[key] = value
        found.append(settings)
    return found


def checkpoint_hyperparameters(path: "str | os.PathLike") -> Dict[str, Any]:
    """The model's saved hyperparameters in the checkpoint at ``path`` (with ``_class_path``
    when the command built the model); ``{}`` if none or unreadable."""
    found = _read_checkpoint(Path(path)).get("hyper_parameters")
    return dict(found) if isinstance(found, dict) else {}


#: Where version 0.1.0 installed the problem packages, and where they live now.
LEGACY_CLASS_PREFIXES = {"models.": "lightning_msvag.models.", "datamodules.": "lightning_msvag.datamodules."}


def legacy_class_path(class_path: str) -> Optional[str]:
    """Today's import path of a 0.1.0 class path (``models.char_lstm.CharLSTM``), else None."""
    for old, new in LEGACY_CLASS_PREFIXES.items():
        if class_path.startswith(old):
            return new + class_path[len(old):]
    return None


def upgrade_checkpoint(path: "str | os.PathLike", out: "str | os.PathLike | None" = None) -> Path:
    """Write a copy of a version-0.1.0 checkpoint with today's class paths; return its path.

    0.1.0 installed the problem packages as top-level ``models`` and ``datamodules``; its
    checkpoints name the model and data classes so (``models.char_lstm.CharLSTM``), which no
    longer import. The copy (``out``, default ``<name>-upgraded.ckpt`` beside it) names
    ``lightning_msvag.models.…`` instead and is otherwise the same; the original is kept.
    """
    from ._io import atomic_open

    source = Path(path)
    target = Path(out) if out is not None else source.with_name(f"{source.stem}-upgraded{source.suffix}")
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    for key in ("hyper_parameters", "datamodule_hyper_parameters"):
        saved = checkpoint.get(key)
        if isinstance(saved, dict) and isinstance(saved.get("_class_path"), str):
            saved["_class_path"] = legacy_class_path(saved["_class_path"]) or saved["_class_path"]
    with atomic_open(target, "wb") as handle:
        torch.save(checkpoint, handle)
    return target


def _read_checkpoint(path: Path) -> Dict[str, Any]:
    """The checkpoint at ``path`` memory-mapped (nothing read until used); ``{}`` if it cannot
    be read: an unreadable file is reported by the checks that load it."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return {}
    return checkpoint if isinstance(checkpoint, dict) else {}


class _CheckedCheckpointIO(CheckpointIO):
    """Wraps the strategy's checkpoint IO: verify CRCs before loading and the contents after."""

    def __init__(self, inner: CheckpointIO, trainer: Trainer) -> None:
        self.inner = inner
        self.trainer = trainer

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None, **kwargs: Any) -> Dict[str, Any]:
        if isinstance(path, (str, os.PathLike)) and "://" not in str(path):
            verify_checkpoint_archive(path)
        try:
            checkpoint = self.inner.load_checkpoint(path, map_location=map_location, **kwargs)
        except (RuntimeError, EOFError, OSError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise CheckpointError(f"checkpoint {path} could not be read ({type(exc).__name__}: {exc})") from None
        check_checkpoint_contents(checkpoint, self.trainer.lightning_module, str(path))
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


class CheckpointGuard(Callback):
    """Refuse damaged or mismatched checkpoints on load; never write a non-finite one.

    Loading (``--ckpt_path``, ``Trainer.fit(ckpt_path=...)``): the strategy's checkpoint IO
    is wrapped in ``setup`` so the file is checked before anything is restored or trained:
    zip CRCs (:func:`verify_checkpoint_archive`), finite parameters and optimizer state, and
    parameter names and shapes against the model (:func:`check_checkpoint_contents`).

    Saving: every process checks the checkpoint about to be written (all checkpoints pass
    through ``on_save_checkpoint``); non-finite parameters or optimizer state raise
    :class:`NonFiniteTrainingError`, which ends the run without writing the file, so
    ``last.ckpt`` stays the last finite state.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if not isinstance(strategy.checkpoint_io, _CheckedCheckpointIO):
            strategy.checkpoint_io = _CheckedCheckpointIO(strategy.checkpoint_io, trainer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        io = trainer.strategy.checkpoint_io
        if isinstance(io, _CheckedCheckpointIO):
            trainer.strategy.checkpoint_io = io.inner

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: Dict[str, Any]) -> None:
        # which method the optimizer state belongs to (strings: loadable with weights_only=True)
        checkpoint[OPTIMIZER_CLASSES_KEY] = [f"{type(o).__module__}.{type(o).__qualname__}" for o in trainer.optimizers]
        bad = nonfinite_entries(checkpoint)
        if bad:
            raise NonFiniteTrainingError(
                f"training diverged at step {trainer.global_step}: non-finite values (NaN/inf) in {_first_few(bad)}; "
                "no checkpoint of this state was written (the last checkpoint is the last finite state). "
                "Lower the learning rate or resume from an earlier checkpoint"
            )


# ============================================================================ pre-emption
class Preempted(SystemExit):
    """Raised after the pre-emption checkpoint is written; the process exits with ``code``."""


def _requeue_signal(trainer: Trainer) -> int:
    """The cluster environment's requeue signal (SLURM: SIGUSR1 unless configured), else SIGUSR1."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    if env is None:
        # Lightning's one private left here: single-device strategies expose no cluster
        # environment, and a SLURMEnvironment(requeue_signal=...) plugin is reachable only
        # through the accelerator connector (Lightning's own signal handling reads it there)
        env = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
    return int(getattr(env, "requeue_signal", None) or signal.SIGUSR1)


class PreemptionCheckpoint(Callback):
    """On SIGTERM or the requeue signal: checkpoint the current step, requeue (SLURM), exit non-zero.

    The signal only sets a flag; at the end of the current training step (all processes
    agree under DDP) the callback writes ``last.ckpt`` into the checkpoint folder (the
    ``ModelCheckpoint``'s, else ``<default_root_dir>/checkpoints``), runs ``scontrol requeue
    $SLURM_JOB_ID`` if the requeue signal arrived under SLURM (``requeue=True``), and raises
    :class:`Preempted`: exit status ``128 + signal number`` (143 for SIGTERM, 138 for SIGUSR1).
    ``--ckpt_path last`` (with the same checkpoint folder, see docs/long_runs.md) resumes it
    exactly. A signal during validation ends the run with the same status and, in a single
    process, a checkpoint written at that point.

    Under DDP every process must stop at the same step, and before Lightning's own SIGTERM
    check at the end of that step. The processes agree through a MAX all-reduce of a one-element
    CPU tensor on a gloo process group (the default group under CPU DDP, one made in
    ``on_train_start`` under NCCL): the GPU stream is never waited for (a flag on the GPU would
    need ``.item()``, a device synchronisation, every step), and the host-side exchange of
    8 bytes is small next to the step (Lightning itself broadcasts its SIGTERM flag on the device
    every step). Where no gloo group can be made, the flag goes through the default group.

    Args:
        requeue_signal: the signal SLURM sends before the time limit (``#SBATCH --signal``);
            SIGUSR1 by default.
        requeue: run ``scontrol requeue`` on the requeue signal under SLURM.
        filename: checkpoint file name without ``.ckpt``.
    """

    def __init__(self, requeue_signal: Optional[int] = None, requeue: bool = True, filename: str = "last") -> None:
        self.requeue_signal = int(requeue_signal) if requeue_signal is not None else None
        self.requeue = requeue
        self.filename = filename
        self.received: Optional[int] = None
        self.saved_path: Optional[str] = None
        self._previous: Dict[int, Any] = {}
        self._group: Any = None  # the CPU (gloo) process group the flags are reduced on (DDP)

    # -- signal handling
    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is None or signum == signal.SIGTERM:
            self.received = int(signum)
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._group = None
        if self._distributed(trainer):
            # every process runs on_train_start, so all take part in making the group
            dist = torch.distributed
            try:
                self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
            except (RuntimeError, ValueError):  # no gloo in this build: the default group
                self._group = None
        # after Lightning registered its handlers (just before the loops run): chain onto them
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        signals = {int(signal.SIGTERM), self.requeue_signal or _requeue_signal(trainer)}
        for signum in signals:
            previous = signal.getsignal(signum)
            if previous is self._handler:
                continue
            if signum != signal.SIGTERM and type(previous).__name__ == "_HandlersCompose":
                # Lightning's SLURM handler saves from inside the signal handler, mid-step;
                # this callback saves at the end of the step instead (and requeues)
                previous = None
            if signum == signal.SIGTERM and self._distributed(trainer):
                # Lightning's SIGTERM handler broadcasts from inside the signal handler, on the
                # signalled rank only, which can cross the step's own collectives (a gloo
                # "connection reset" or a hang); here the ranks agree through the flag instead
                previous = None
            self._previous[signum] = previous
            signal.signal(signum, self._handler)

    def _restore_handlers(self) -> None:
        for signum, previous in self._previous.items():
            try:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            except (ValueError, TypeError):  # not the main thread / odd handler
                pass
        self._previous = {}

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore_handlers()
        self._group = None

    # -- acting on it
    def _checkpoint_path(self, trainer: Trainer) -> str:
        callback = trainer.checkpoint_callback
        last = getattr(callback, "last_model_path", "") if self.filename == "last" else ""
        if last:  # the file ModelCheckpoint keeps as "last" in this run (e.g. last-v1.ckpt)
            return str(last)
        dirpath = getattr(callback, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        return os.path.join(str(dirpath), f"{self.filename}.ckpt")

    @staticmethod
    def _distributed(trainer: Trainer) -> bool:
        return trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def _signal_seen(self, trainer: Trainer) -> Optional[int]:
        """The signal to stop on at the end of this step, the same in every process (or None)."""
        local = self.received
        if local is None and getattr(trainer, "received_sigterm", False):
            local = int(signal.SIGTERM)
        if not self._distributed(trainer):
            return local
        dist = torch.distributed
        if self._group is None:  # no gloo group: on the default group's device (a device sync)
            flag = torch.tensor([local or 0], device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return int(flag.item()) or None
        # a CPU tensor on the gloo group: no device synchronisation, no wait on the GPU stream
        flag = torch.tensor([local or 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item()) or None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        signum = self._signal_seen(trainer)
        if signum is None:
            return
        self._stop(trainer, signum)

    def _stop(self, trainer: Trainer, signum: int) -> None:
        from pytorch_lightning.utilities import rank_zero_info

        path = self._checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # the full state (stated: no "was not set" line)
        self.saved_path = path
        name = signal.Signals(signum).name
        rank_zero_info(f"{name} received: wrote {path} at step {trainer.global_step}; resume with --ckpt_path last")
        if trainer.is_global_zero and self.requeue and signum != signal.SIGTERM:
            self._requeue_slurm_job()
        raise Preempted(128 + signum)

    @staticmethod
    def _requeue_slurm_job() -> None:
        job = os.environ.get("SLURM_JOB_ID")
        if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        if not job:
            return
        try:
            subprocess.run(["scontrol", "requeue", job], check=False, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:  # pragma: no cover - depends on the cluster
            print(f"lightning-msvag: could not requeue SLURM job {job}: {exc}", flush=True)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if isinstance(exception, Preempted) or not isinstance(exception, SIGTERMException):
            return
        # Lightning stopped on SIGTERM outside a training step (e.g. during validation): the
        # scheduler must not see success. A checkpoint needs all processes; only in one process.
        if trainer.world_size == 1 and self.saved_path is None:
            path = self._checkpoint_path(trainer)
            trainer.save_checkpoint(path, weights_only=False)
            self.saved_path = path
            print(f"SIGTERM received: wrote {path} at step {trainer.global_step}; resume with --ckpt_path last",
                  flush=True)
        exception.code = 128 + int(signal.SIGTERM)


def fault_tolerance_callbacks() -> List[Callback]:
    """The callbacks the ``lightning-msvag`` command adds: exact resume, checkpoint checks, pre-emption."""
    return [ExactResume(), CheckpointGuard(), PreemptionCheckpoint()]
