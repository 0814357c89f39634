"""The callbacks the command adds so that the configs stay free of them (docs/long_runs.md):
the run's ``last.ckpt`` every few minutes, the step-size monitor, the mini-batch estimate
where the optimizer needs it, the resume-aware progress bar and the fault-tolerance callbacks."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar

from ..batch_variance_callback import BatchVarianceCallback
from ..fault_tolerance import ResumedEpochProgressBar, fault_tolerance_callbacks
from .namespace import _get


#: Minutes between the periodic ``last.ckpt`` saves the command's checkpoint makes by default
#: (``--checkpoint_every``): a killed run loses at most this much work (docs/long_runs.md).
CHECKPOINT_EVERY_MINUTES = 5.0


def run_checkpoint(every_minutes: float = CHECKPOINT_EVERY_MINUTES) -> ModelCheckpoint:
    """The command's checkpoint: one file, ``last.ckpt``, written every ``every_minutes`` of
    training (0: no periodic saves) and at the end of every epoch and validation, and
    overwritten in place, also by a resumed run (no ``last-v1.ckpt``, no second copy named
    after the epoch: a resume finds the state it continues, and a save is one file)."""
    if every_minutes < 0:
        raise ValueError(f"--checkpoint_every must be >= 0 minutes, got {every_minutes}")
    interval = timedelta(minutes=every_minutes) if every_minutes > 0 else None
    return ModelCheckpoint(save_top_k=0, save_last=True, enable_version_counter=False, train_time_interval=interval,
                           every_n_epochs=None if interval else 1)


def default_callbacks(trainer_config: dict, optimizer: Any = None,
                      checkpoint_every: float = CHECKPOINT_EVERY_MINUTES) -> list:
    """The callbacks the project adds to ``trainer_config`` (see the module docstring);
    ``optimizer``: the config's optimizer entry (class_path, init_args)."""
    configured = list(trainer_config.get("callbacks") or [])
    added: list = []
    if _needs_batch_variance(optimizer) and not any(isinstance(c, BatchVarianceCallback) for c in configured):
        # variance="minibatch" reads p.grad_batch_variance every step (docs/algorithm.md §1.1)
        added.append(BatchVarianceCallback())
    checkpointing = trainer_config.get("enable_checkpointing") is not False
    if checkpointing and not any(isinstance(c, ModelCheckpoint) for c in configured):
        added.append(run_checkpoint(checkpoint_every))
    if trainer_config.get("logger") is not False and not any(isinstance(c, LearningRateMonitor) for c in configured):
        # per logged step (log_every_n_steps), so a run resumed mid-epoch logs it too
        added.append(LearningRateMonitor(logging_interval="step"))
    if trainer_config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in configured):
        added.append(ResumedEpochProgressBar())  # the epoch's length also after a mid-epoch resume
    # exact mid-epoch resume (RNG states), checkpoint checks, pre-emption (docs/long_runs.md)
    added.extend(cb for cb in fault_tolerance_callbacks() if not any(type(c) is type(cb) for c in configured))
    return added


def _needs_batch_variance(optimizer: Any) -> bool:
    """The configured optimizer runs a ``variance="minibatch"`` rule (it needs the estimate)."""
    return str(_get(_get(optimizer, "init_args"), "variance", "")) == "minibatch"
