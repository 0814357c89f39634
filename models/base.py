"""Shared LightningModule behaviour of the four test problems (docs/problems.md).

DeepOBS (TensorFlow) defines every test problem by per-example losses, an L2
``regularizer`` (``tf.losses.get_regularization_loss()``) and an accuracy, and
its runner trains on and reports ``mean(losses) + regularizer`` for the
training-set evaluation portion ("train_eval") and the test set. This base class
reproduces that contract for Lightning.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["ClassificationProblem", "EVAL_SPLITS"]

#: Names of the evaluation splits, by validation dataloader index.
EVAL_SPLITS: tuple[str, ...] = ("train_eval", "test")


class ClassificationProblem(pl.LightningModule):
    """Base class: cross-entropy + L2 objective, accuracy metrics and logging (docs/problems.md, DeepOBS).

    **Objective.** ``loss = mean cross-entropy + Σ (weight_decay / 2) · ‖W‖²`` where
    the sum runs over the weights of the ``nn.Conv2d`` and ``nn.Linear`` layers
    only — never biases, batch-norm scale/shift, embeddings or LSTM kernels
    (docs/problems.md: "conv/linear weights only"; this is DeepOBS's
    ``kernel_regularizer=l2_regularizer(wd)`` = ``wd · ‖W‖² / 2`` per layer). The
    layers are collected once, when the subclass calls :meth:`_collect_l2_modules`
    at the end of its ``__init__``; each step only reads their ``.weight``
    (modules, not the parameter objects, are kept so that a later
    ``load_state_dict(..., assign=True)`` which swaps parameter objects cannot
    leave the list stale). For per-character models the cross-entropy is the mean
    over all ``batch × time`` positions.

    **Evaluation loss.** Validation and test report the *same* objective, mean
    cross-entropy + L2 term, as DeepOBS's runner does (its evaluated ``loss`` is
    ``reduce_mean(losses) + regularizer``), so ``train/loss`` and
    ``train_eval/loss`` are directly comparable. The L2 term does not depend on
    the data; subtract :meth:`regularizer` to get the pure cross-entropy.

    **Logging.**

    * ``training_step``: ``train/loss`` (full objective), ``train/cross_entropy``,
      ``train/accuracy`` — per step, not synchronised across processes.
    * ``validation_step``: the data modules return ``[train_eval, test]`` loaders;
      dataloader 0 logs ``train_eval/loss`` and ``train_eval/accuracy``, dataloader 1
      logs ``test/loss`` and ``test/accuracy`` (epoch-level, batch-size weighted,
      ``sync_dist=True``, no dataloader suffix). With a single validation loader
      it is treated as ``train_eval``. Each split has its own torchmetrics object.
    * ``test_step``: ``test/loss``, ``test/accuracy``.

    **Optimizers.** Deliberately *no* ``configure_optimizers``: the optimizer and
    schedule under study are supplied from outside (LightningCLI's
    ``--optimizer``/``--lr_scheduler`` inject it, or assign one yourself).

    Subclasses build their layers, call ``self.save_hyperparameters()``, then
    ``self._collect_l2_modules()``; stateful models override :meth:`step_logits`.

    Args:
        num_classes: number of classes (vocabulary size for character models).
        weight_decay: L2 factor ``wd`` of the loss term ``(wd/2)·Σ‖W‖²``.
    """

    #: Layer types whose ``.weight`` enters the L2 term.
    l2_layer_types: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)

    def __init__(self, num_classes: int, weight_decay: float = 0.0) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.num_classes = int(num_classes)
        self.weight_decay = float(weight_decay)
        # One metric object per split so that train, train_eval and test never mix.
        # "micro" = fraction of correct predictions (the default "macro" would
        # average per-class accuracies, which is not DeepOBS's accuracy).
        self.train_accuracy = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        self.train_eval_accuracy = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        self._l2_modules: list[nn.Module] = []
        self._l2_collected = False

    # ------------------------------------------------------------------ L2 term
    def _collect_l2_modules(self) -> None:
        """Record, once, the layers whose weights are L2-regularised (call at the end of ``__init__``)."""
        self._l2_modules = [m for m in self.modules() if isinstance(m, self.l2_layer_types)]
        self._l2_collected = True

    def l2_weights(self) -> list[Tensor]:
        """The weight tensors that enter the L2 term, in module order."""
        if not self._l2_collected:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call self._collect_l2_modules()")
        return [m.weight for m in self._l2_modules]

    def regularizer(self) -> Tensor:
        """``(weight_decay / 2) · Σ ‖W‖²`` over :meth:`l2_weights` (a 0-dim tensor; exact 0 if wd = 0)."""
        weights = self.l2_weights()
        if self.weight_decay == 0.0 or not weights:
            return torch.zeros((), device=self.device)
        squared = torch.stack([w.square().sum() for w in weights]).sum()
        return 0.5 * self.weight_decay * squared

    # ---------------------------------------------------------------- forward
    def step_logits(self, x: Tensor, stream: str, batch_idx: int) -> Tensor:
        """Logits for one batch of the data stream ``stream`` (``"train"``, ``"val/0"``, ``"test/0"``, ...).

        Stateless models ignore ``stream``/``batch_idx``; the character LSTM uses them
        to carry its recurrent state per stream.
        """
        return self(x)

    def _objective(self, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(loss, cross_entropy, predictions)``; works for ``[B, C]`` and ``[B, T, C]`` logits."""
        cross_entropy = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss = cross_entropy + self.regularizer()
        return loss, cross_entropy, logits.argmax(dim=-1)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.step_logits(x, "train", batch_idx)
        loss, cross_entropy, preds = self._objective(logits, y)
        batch_size = y.shape[0]
        self.train_accuracy(preds, y)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        self.log("train/cross_entropy", cross_entropy, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("train/accuracy", self.train_accuracy, on_step=True, on_epoch=False, batch_size=batch_size)
        return loss

    def _eval_split(self, dataloader_idx: int) -> str:
        if not 0 <= dataloader_idx < len(EVAL_SPLITS):
            raise ValueError(
                f"validation expects at most {len(EVAL_SPLITS)} dataloaders {EVAL_SPLITS}, got index {dataloader_idx}"
            )
        return EVAL_SPLITS[dataloader_idx]

    def _eval_step(self, batch: Any, batch_idx: int, stream: str, split: str, add_dataloader_idx: bool) -> Tensor:
        x, y = batch
        logits = self.step_logits(x, stream, batch_idx)
        loss, _, preds = self._objective(logits, y)
        metric = self.train_eval_accuracy if split == "train_eval" else self.test_accuracy
        metric.update(preds, y)
        batch_size = y.shape[0]
        self.log(
            f"{split}/loss", loss, on_step=False, on_epoch=True, sync_dist=True,
            add_dataloader_idx=add_dataloader_idx, batch_size=batch_size,
        )
        # torchmetrics objects synchronise themselves; sync_dist applies to plain tensors only.
        self.log(
            f"{split}/accuracy", metric, on_step=False, on_epoch=True,
            add_dataloader_idx=add_dataloader_idx, batch_size=batch_size,
        )
        return loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        split = self._eval_split(dataloader_idx)
        return self._eval_step(batch, batch_idx, f"val/{dataloader_idx}", split, add_dataloader_idx=False)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        # Lightning only appends "/dataloader_idx_k" when there are several test loaders,
        # so a single test loader logs plain "test/loss" and "test/accuracy".
        return self._eval_step(batch, batch_idx, f"test/{dataloader_idx}", "test", add_dataloader_idx=True)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Return the logits of the batch's inputs (``batch`` may be ``x`` or ``(x, y)``)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.step_logits(x, f"predict/{dataloader_idx}", batch_idx)
