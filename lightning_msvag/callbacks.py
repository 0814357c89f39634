"""Lightning callbacks: :class:`VarianceAdaptationMonitor` watches γ during training.

M-SVAG (and SVAG) multiply every coordinate of the update by a variance-adaptation factor
γ ∈ [0, 1] (docs/algorithm.md §1); Adam does the same implicitly with (1 + η̂²)^(−1/2)::

    from lightning_msvag.callbacks import VarianceAdaptationMonitor
    trainer = Trainer(callbacks=[VarianceAdaptationMonitor(logging_interval=50)])

The hooks only schedule and log. Reading γ out of an optimizer is
:mod:`lightning_msvag.factors`; the per-tensor reductions and the logged statistics (one
``_extract_*`` function each) are :mod:`lightning_msvag.statistics`. See docs/monitoring.md.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.core.optimizer import LightningOptimizer
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from .factors import MomentTracker, UnreadableOptimizer, is_untracked_dissected, read_factors
from .statistics import STATISTICS, HistogramData, Summary, histogram_quantiles, reduce_factor, summarise

__all__ = ["VarianceAdaptationMonitor", "HistogramData", "histogram_quantiles"]


class VarianceAdaptationMonitor(Callback):
    r"""Log the variance-adaptation factors γ (and the relative variance η̂²) during training.

    Like Lightning's ``LearningRateMonitor``: after every ``logging_interval``-th optimizer
    step (``on_train_batch_end``), global rank zero reads the optimizers' public state and
    logs through ``trainer.loggers``, at the step Lightning uses for ``train/loss`` of the
    same batch; histograms go to TensorBoard (``add_histogram_raw``). It never changes
    training: no random numbers, no writes to the optimizer or model.

    Logged per parameter (``<name>`` from ``named_parameters()``) and for ``all``:
    ``gamma/<name>/{mean,median,q10,q90,frac_below_0.5}``, ``eta2/<name>/median`` and the
    histogram ``gamma_hist/<name>`` (:data:`lightning_msvag.statistics.STATISTICS`).
    Supported optimizers: MSVAG, SVAG, Adam/AdamW, and MSGD/MSSD with ``track_moments``
    (:mod:`lightning_msvag.factors`); others are skipped with one warning. Strategies that
    shard the optimizer state (FSDP, DeepSpeed, ``ZeroRedundancyOptimizer``, DTensor
    parameters) switch the monitor off with a warning at ``on_train_start``.

    Args:
        logging_interval: log when ``trainer.global_step % logging_interval == 0``, and
            after the steps 1, 2, 4, 8, ... below it (the early γ, where it changes fastest);
            ``None`` follows the trainer's ``log_every_n_steps``.
        track_moments: for M-SGD / M-SSD, keep a v~ buffer per parameter (rank zero only,
            updated in ``on_before_optimizer_step``) to log the γ M-SVAG would apply. It
            starts at zero on every ``fit`` and is part of the callback's state
            (``state_dict``), so a fit resumed from a checkpoint continues it: the logged γ
            equals an uninterrupted run's.
        per_tensor: log the per-tensor statistics; ``False`` logs only ``all``.
        histograms: write the γ histograms (the ``gamma_hist`` statistic).
        num_bins: buckets of the displayed γ histogram; must divide ``quantile_bins``.
        quantile_bins: fine γ bins on [0, 1] the quantiles are read from (even).
        eta2_bins: bins of the log10 η̂² histogram on [−10, 10].
        statistics: short names from ``STATISTICS`` to log; ``None``: those on by default.
    """

    def __init__(
        self,
        logging_interval: Optional[int] = 50,
        track_moments: bool = False,
        per_tensor: bool = True,
        histograms: bool = True,
        num_bins: int = 50,
        quantile_bins: int = 1000,
        eta2_bins: int = 2000,
        statistics: Optional[Sequence[str]] = None,
    ) -> None:
        if logging_interval is not None and (
            isinstance(logging_interval, bool) or not isinstance(logging_interval, int) or logging_interval < 1
        ):
            raise ValueError(f"logging_interval must be a positive integer or None, got {logging_interval!r}")
        for name, value in (("num_bins", num_bins), ("quantile_bins", quantile_bins), ("eta2_bins", eta2_bins)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if quantile_bins % num_bins or quantile_bins % 2:
            raise ValueError(
                f"quantile_bins ({quantile_bins}) must be even (0.5 a bin edge) and divisible by num_bins ({num_bins})"
            )
        if statistics is None:
            statistics = [key for key, stat in STATISTICS.items() if stat.default]
        unknown = sorted(set(statistics) - set(STATISTICS))
        if unknown:
            raise ValueError(f"unknown statistics {unknown}; known: {list(STATISTICS)}")
        self.logging_interval = logging_interval
        self.track_moments = bool(track_moments)
        self.per_tensor = bool(per_tensor)
        self.histograms = bool(histograms)
        self.num_bins = num_bins
        self.quantile_bins = quantile_bins
        self.eta2_bins = eta2_bins
        self.statistics = [key for key in STATISTICS if key in set(statistics)]  # registry order
        self._disabled: Optional[str] = None
        self._warned: set = set()
        self._last_logged_step = -1
        self._tracker = MomentTracker()
        self._names: Dict[Tensor, str] = {}  # parameter -> name, for the tracker's state
        self._restored: Optional[Dict[str, Any]] = None  # tracker state from a checkpoint

    # ------------------------------------------------------------------ callback state
    def state_dict(self) -> Dict[str, Any]:
        """The tracked v~ (``track_moments``), by parameter name; empty otherwise (nothing is stored)."""
        if not self.track_moments or not len(self._tracker):
            return {}
        return {"moment_tracker": self._tracker.state_dict(self._names)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # Lightning restores callback states before the parameters are on their device;
        # the buffers are matched to them in on_train_start
        self._restored = state_dict.get("moment_tracker")

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._disabled = None
        self._tracker = MomentTracker()  # v~ starts at zero on every fit ...
        restored, self._restored = self._restored, None
        self._last_logged_step = -1
        reason = _sharding_reason(trainer)
        if reason is not None:
            self._disabled = reason
            rank_zero_warn(
                f"VarianceAdaptationMonitor is disabled: {reason}, so rank zero would see only its shard "
                "and log wrong statistics. Use DDP (replicated optimizer state) to monitor γ.",
                category=UserWarning,
            )
            return
        if not trainer.loggers:
            self._disabled = "no logger"
            rank_zero_warn("VarianceAdaptationMonitor: the trainer has no logger; nothing will be logged.")
            return
        if self.histograms and _tensorboard_writer(trainer) is None:
            self._warn_once(
                "no-tensorboard",
                "VarianceAdaptationMonitor: no TensorBoardLogger among the trainer's loggers; "
                "γ histograms are skipped (scalars are still logged).",
            )
        if self.track_moments:
            self._names = {p: name for name, p in pl_module.named_parameters()}
            if restored is not None and trainer.is_global_zero:
                # ... and a resumed fit continues the checkpoint's (docs/monitoring.md)
                self._tracker.load_state_dict(restored, {name: p for p, name in self._names.items()})

    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Optimizer
    ) -> None:
        if not self.track_moments or self._disabled or not trainer.is_global_zero:
            return
        optimizer = _unwrap(optimizer)
        if is_untracked_dissected(optimizer):
            self._tracker.update(optimizer)  # sees the gradients before clipping

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._disabled or not trainer.is_global_zero:
            return
        step = trainer.global_step
        if step == 0 or step == self._last_logged_step or not self._due(step, self._interval(trainer)):
            return
        self._last_logged_step = step
        scalars, hists = self.compute(pl_module, trainer.optimizers)
        # The axis of Lightning's own self.log (batches that stepped, from 0): the γ after optimizer
        # step k lands at k - 1, beside the loss of the batch that made update k (docs/monitoring.md).
        log_step = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        log_step = getattr(log_step, "_batches_that_stepped", step - 1)
        if scalars:
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=log_step)
        writer = _tensorboard_writer(trainer) if hists else None
        if writer is not None:
            for tag, h in hists.items():
                writer.add_histogram_raw(
                    tag, h.min, h.max, h.num, h.sum, h.sum_squares, h.bucket_limits, h.bucket_counts,
                    global_step=log_step,
                )

    # ------------------------------------------------------------------ what is logged
    @torch.no_grad()
    def compute(
        self, pl_module: "pl.LightningModule", optimizers: Sequence[Optimizer]
    ) -> Tuple[Dict[str, float], Dict[str, HistogramData]]:
        """The scalars and histograms of one logging step, as ``(scalars, histograms)`` dicts.

        Usable without a trainer (``compute(model, [optimizer])``). Per tensor, the reductions
        stay on the parameter's device and are copied to the host once per device.
        """
        names = {p: name for name, p in pl_module.named_parameters()}
        entries: List[Tuple[str, Dict[str, Tensor]]] = []
        seen = set()
        for index, optimizer in enumerate(optimizers):
            try:
                factors = read_factors(_unwrap(optimizer), self._tracker if self.track_moments else None)
            except UnreadableOptimizer as error:
                self._warn_once(error.key, f"VarianceAdaptationMonitor: {error}")
                continue
            for p, gamma, lam, power in factors:
                if p in seen or p.numel() == 0:
                    continue
                seen.add(p)
                name = names.get(p, f"optimizer{index}.param{len(seen) - 1}")
                entries.append((name, reduce_factor(gamma, lam, power, self.quantile_bins, self.eta2_bins)))
        if not entries:
            return {}, {}
        summaries = [
            (name, Summary(**fields, num_bins=self.num_bins)) for (name, _), fields in zip(entries, _to_host(entries))
        ]
        scalars: Dict[str, float] = {}
        hists: Dict[str, HistogramData] = {}
        pooled = [("all", Summary.merge([s for _, s in summaries]))]
        for name, summary in (summaries if self.per_tensor else []) + pooled:
            more_scalars, more_hists = summarise(name, summary, self.statistics, histograms=self.histograms)
            scalars.update(more_scalars)
            hists.update(more_hists)
        return scalars, hists

    # ------------------------------------------------------------------ helpers
    def _warn_once(self, key: Any, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=UserWarning)

    @staticmethod
    def _due(step: int, interval: int) -> bool:
        """Every ``interval``-th step, and the powers of two below it (steps 1, 2, 4, ...): γ
        changes fastest early in a run, and a short look (README: 30 steps) shows it."""
        return step % interval == 0 or (step < interval and step & (step - 1) == 0)

    def _interval(self, trainer: "pl.Trainer") -> int:
        return self.logging_interval if self.logging_interval is not None else max(1, int(trainer.log_every_n_steps))


def _unwrap(optimizer: Optimizer) -> Optimizer:
    return optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def _sharding_reason(trainer: "pl.Trainer") -> Optional[str]:
    """Why rank zero would see only a shard of the optimizer state, or ``None``."""
    strategy = type(trainer.strategy).__name__
    if any(key in strategy for key in ("FSDP", "DeepSpeed", "ModelParallel")):
        return f"the {strategy} shards parameters and optimizer state across ranks"
    for optimizer in trainer.optimizers:
        if any(cls.__name__ == "ZeroRedundancyOptimizer" for cls in type(_unwrap(optimizer)).__mro__):
            return "ZeroRedundancyOptimizer keeps each rank's shard of the optimizer state only"
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        return None
    model = trainer.lightning_module
    if model is not None and any(isinstance(p, DTensor) for p in model.parameters()):
        return "the parameters are DTensors (sharded across ranks)"
    return None


def _tensorboard_writer(trainer: "pl.Trainer"):
    from pytorch_lightning.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and hasattr(logger.experiment, "add_histogram_raw"):
            return logger.experiment
    return None


def _to_host(entries: List[Tuple[str, Dict[str, Tensor]]]) -> List[Dict[str, Any]]:
    """Each entry's named device tensors as numpy values, with one transfer per device."""
    by_device: Dict[torch.device, List[int]] = {}
    for i, (_, fields) in enumerate(entries):
        by_device.setdefault(next(iter(fields.values())).device, []).append(i)
    out: List[Dict[str, Any]] = [{} for _ in entries]
    for device, indices in by_device.items():
        flat = [(i, key, t) for i in indices for key, t in entries[i][1].items()]
        joined = [t.reshape(-1) for _, _, t in flat]
        if device.type != "cpu":
            joined = torch.cat(joined).cpu().split([t.numel() for t in joined])
        for (i, key, t), part in zip(flat, joined):
            out[i][key] = part.numpy().reshape(t.shape)
    return out
