"""Lightning side of the mini-batch variance estimate (lightning_msvag.batch_variance).

:class:`BatchVarianceCallback` arms a :class:`~lightning_msvag.batch_variance.BatchVarianceEstimator`
on the LightningModule before every training forward and forms σ̂² right after the backward
(``on_after_backward``, i.e. before the optimizer step), so that the optimizer finds
``p.grad_batch_variance`` (σ̂², shape of ``p``) on every parameter when it steps, once
(the step uses it up; Lightning's gradient clipping by norm, between the two, rescales it:
:mod:`lightning_msvag.batch_estimate`). Under DDP the moments Σ∇ℓ_k, Σ∇ℓ_k² and the example count are all-reduced
over the ranks by the estimator (one extra reduction of twice the gradient size), so the
estimate is the one-process estimate for the global batch.

Refused with a one-line error at ``on_fit_start`` (:meth:`BatchVarianceCallback.check`; the CLI
calls it before anything is written): gradient accumulation (``accumulate_grad_batches > 1``:
several backward passes per step) and 16-bit float precision with a loss scaler
(``16-mixed``/``16-true``); plus everything the estimator refuses (BatchNorm in training mode
first). Clipping by value (``gradient_clip_algorithm="value"``) is refused by the optimizer's
step when it changes a gradient.
The loss returned by ``training_step`` must be a mean over the batch's examples plus
deterministic terms (the problems in ``models/`` are: mean cross-entropy + L2).

YAML (LightningCLI)::

    trainer:
      callbacks:
        - class_path: lightning_msvag.batch_variance_callback.BatchVarianceCallback
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from .batch_variance import BatchVarianceError, BatchVarianceEstimator

__all__ = ["BatchVarianceCallback"]


class BatchVarianceCallback(Callback):
    """Set ``p.grad_batch_variance`` (σ̂² of the mean gradient, paper §4.1) before every optimizer step.

    Args:
        loss_reduction: ``"mean"`` (the default; the problems' losses) or ``"sum"`` over examples.
    """

    def __init__(self, loss_reduction: str = "mean") -> None:
        self.loss_reduction = loss_reduction
        self.estimator: BatchVarianceEstimator | None = None

    @staticmethod
    def check(model: pl.LightningModule, accumulate_grad_batches: int = 1, precision: Any = "32") -> None:
        """Everything that refuses a run before it starts: gradient accumulation, float16 with a loss
        scaler, and what the estimator refuses of ``model`` (BatchNorm in training mode first);
        :class:`~lightning_msvag.batch_variance.BatchVarianceError` in one line. The CLI calls it
        before the trainer exists, so that a refused run leaves no folder behind."""
        if accumulate_grad_batches != 1:
            raise BatchVarianceError(
                f"accumulate_grad_batches={accumulate_grad_batches}: the mini-batch variance needs one backward per step"
            )
        if str(precision).startswith("16"):
            raise BatchVarianceError(f"precision {str(precision)!r}: float16 with a loss scaler is not supported by the mini-batch variance; use bf16-mixed or 32")
        BatchVarianceEstimator(model).close()  # BatchNorm in training mode is its first refusal

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(pl_module, trainer.accumulate_grad_batches, trainer.precision)
        self.estimator = BatchVarianceEstimator(pl_module, loss_reduction=self.loss_reduction)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.estimator is not None:
            self.estimator.start()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.estimator is not None and pl_module.training:
            self.estimator.compute()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.estimator is not None:
            self.estimator.close()
            self.estimator = None
