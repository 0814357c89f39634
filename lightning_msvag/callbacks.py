"""Lightning callbacks: :class:`VarianceAdaptationMonitor` watches γ during training.

M-SVAG (and SVAG) multiply every coordinate of the update by a variance-adaptation factor
γ ∈ [0, 1] (docs/algorithm.md §1); Adam does the same implicitly with (1 + η̂²)^(−1/2). The monitor logs,
per parameter tensor and over the whole model, how these factors are distributed, where
TensorBoard shows them as scalars and histograms::

    from lightning_msvag.callbacks import VarianceAdaptationMonitor
    trainer = Trainer(callbacks=[VarianceAdaptationMonitor(logging_interval=50)])

    lightning-msvag fit --config configs/cifar10_3c3d.yaml \\
        --trainer.callbacks+=lightning_msvag.callbacks.VarianceAdaptationMonitor

See ``docs/monitoring.md`` for what each logged quantity means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.core.optimizer import LightningOptimizer
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from .functional import bias_correction, variance_adaptation_factor, variance_ratio
from .optimizers import DissectedOptimizer

__all__ = ["VarianceAdaptationMonitor", "HistogramData", "histogram_quantiles"]

#: η̂² is binned on a log10 scale over [10^-ETA2_LOG10_RANGE, 10^+ETA2_LOG10_RANGE].
ETA2_LOG10_RANGE = 10.0
#: Elements per ``torch.histc`` call: float32 bin counts stay exact below 2**24.
_HISTC_CHUNK = 2**24
#: Statistics in the order of the per-tensor result vector (before the two histograms).
_N_MOMENTS = 4  # sum, sum of squares, min, max

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class HistogramData:
    """One histogram as TensorBoard's raw API takes it (``SummaryWriter.add_histogram_raw``).

    ``bucket_limits[i]`` is the right edge of bucket ``i``; the left edge of bucket 0 is
    ``min`` (TensorBoard's convention). Empty buckets at both ends are trimmed.
    """

    min: float
    max: float
    num: float
    sum: float
    sum_squares: float
    bucket_limits: List[float]
    bucket_counts: List[float]


def histogram_quantiles(
    counts: np.ndarray, low: float, high: float, quantiles: Sequence[float], vmin: float = -math.inf, vmax: float = math.inf
) -> List[float]:
    """Quantiles of data known only through a histogram of equal-width bins on [low, high].

    Linear interpolation inside the bin where the cumulative count reaches ``q · N``, the
    result clipped to the data's [vmin, vmax]. The error is at most one bin width (for γ:
    1/``quantile_bins``, default 1e-3) against the exact quantile.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return [math.nan] * len(quantiles)
    cumulative = np.cumsum(counts)
    width = (high - low) / len(counts)
    out = []
    for q in quantiles:
        target = q * total
        i = min(int(np.searchsorted(cumulative, target, side="left")), len(counts) - 1)
        before = cumulative[i - 1] if i > 0 else 0.0
        frac = (target - before) / counts[i] if counts[i] > 0 else 0.0
        out.append(float(min(max(low + (i + min(max(frac, 0.0), 1.0)) * width, vmin), vmax)))
    return out


def _histc_exact(x: Tensor, bins: int, low: float, high: float) -> Tensor:
    """``torch.histc`` in chunks of < 2**24 elements, summed in float64 (exact counts)."""
    flat = x.reshape(-1)
    if flat.numel() <= _HISTC_CHUNK:
        return torch.histc(flat, bins=bins, min=low, max=high).double()
    hist = torch.zeros(bins, dtype=torch.float64, device=x.device)
    for chunk in flat.split(_HISTC_CHUNK):
        hist += torch.histc(chunk, bins=bins, min=low, max=high).double()
    return hist


class VarianceAdaptationMonitor(Callback):
    r"""Log the variance-adaptation factors γ (and the relative variance η̂²) during training.

    Shaped like Lightning's ``LearningRateMonitor``: reads the optimizers' public state
    after the optimizer step (``on_train_batch_end``) every ``logging_interval`` optimizer
    steps and writes, on global rank zero only, through ``trainer.loggers``. It never
    changes training: no random numbers, no writes to the optimizer or the model, all
    arithmetic under ``torch.no_grad`` on temporary tensors.

    **What is read, per optimizer type.**

    * :class:`~lightning_msvag.MSVAG`, :class:`~lightning_msvag.SVAG`: γ of the latest
      step, computed per tensor by :func:`~lightning_msvag.variance_adaptation_factor`,
      the same function their ``variance_adaptation_factors()`` uses (one tensor at a time,
      so only one tensor's γ is alive at once). The relative variance is η̂² = s / m² with
      s = (v − m²)/(1 − ρ); M-SVAG's γ = 1/(1 + ρ η̂²), SVAG's γ = 1/(1 + η̂²) (docs/algorithm.md §1), so
      η̂² is recovered from γ as (1/γ − 1)/ρ (M-SVAG) or 1/γ − 1 (SVAG). At k = 1, s = 0
      exactly, so η̂² = 0 (γ = 1).
    * ``torch.optim.Adam`` (and ``AdamW``): Adam's implicit factor (1 + η̂²)^(−1/2) = |m|/√v
      with m = exp_avg/(1 − β1^k), v = exp_avg_sq/(1 − β2^k), η̂² = (v − m²)/m² clipped at 0
      (with β1 ≠ β2, m² can exceed v; the factor is then 1), and η̂² = 1/factor² − 1.
      ε and ``amsgrad``'s running maximum are ignored: this is the paper's factor, not the
      exact step.
    * :class:`~lightning_msvag.MSGD`, :class:`~lightning_msvag.MSSD`: what M-SVAG's γ
      would be for the same gradients, if ``track_moments=True``. They keep no v~, so the
      monitor keeps one itself: **one extra buffer per parameter** (the parameter's size,
      on its device, on rank zero only) and one pass over the gradients at every optimizer
      step (``on_before_optimizer_step``, i.e. before gradient clipping; with clipping, v~
      sees unclipped gradients while m~ (the optimizer's ``exp_avg``) sees clipped ones).
      m~ is read from the optimizer. Off by default. The buffers are not checkpointed: after
      a resume v~ restarts at zero (bias-corrected with its own step count).
    * anything else: one warning per optimizer type, then it is skipped.

    **What is logged** (``<name>`` is the parameter name from ``named_parameters()``, e.g.
    ``lstm_layers.0.weight_ih``, so all tensors of one layer sort together):

    * ``gamma/<name>/mean``, ``/median``, ``/q10``, ``/q90``, ``/frac_below_0.5``
    * ``eta2/<name>/median``: median estimated relative variance η̂² (the quantity γ
      responds to). Coordinates with m = 0 (γ = 0) count as η̂² = +∞, i.e. they sort above
      every other value; η̂² is binned on a log scale clipped to [1e-10, 1e10], so the
      logged median is finite (1e10 where more than half the tensor has m = 0). Since η̂²
      is recovered from the float32 γ, values below ~1e-6 (γ within 1e-7 of 1) are not
      resolved and land in the lowest bins.
    * ``gamma_hist/<name>``: histogram of γ over [0, 1] (``num_bins`` buckets).
    * the same with ``<name>`` = ``all`` over all monitored coordinates of the model.

    Scalars go to every logger of the trainer via ``logger.log_metrics`` (as
    ``LearningRateMonitor`` does, so they are written regardless of ``log_every_n_steps``),
    with the step Lightning uses for ``train/loss`` of the same batch. Histograms go to
    TensorBoard through ``SummaryWriter.add_histogram_raw``; without a TensorBoardLogger
    they are skipped with one warning.

    **How.** Per tensor, everything is computed on the parameter's device: γ, one
    ``torch.histc`` of γ with ``quantile_bins`` bins on [0, 1] (which also gives the exact
    count and count(γ < 0.5), 0.5 being a bin edge), one ``torch.histc`` of log10 η̂²,
    sum, sum of squares, min and max of γ: about 15 elementwise passes over a parameter's
    size, with no host synchronisation; all results are concatenated and copied to the
    host once per logging step. Quantiles (median, q10,
    q90) are read from the fine γ histogram by linear interpolation inside the bin, clipped
    to the data's [min, max]: absolute error ≤ 1/``quantile_bins`` (1e-3 by default), no
    size limit and no sort (``torch.quantile`` refuses more than 16M elements and sorts).
    The η̂² median comes from a histogram of log10 η̂² with ``eta2_bins`` bins on [−10, 10]:
    relative error ≤ 10^(20/``eta2_bins``) − 1 (2.3 % by default). The displayed histogram
    sums groups of the fine bins. The ``all`` statistics sum the per-tensor histograms, so
    they cost nothing extra.

    **Distributed.** Only global rank zero computes and writes. Under DDP every rank holds
    the same optimizer state (gradients are averaged before the step), so rank zero's
    numbers are the model's and no communication is needed. Strategies that shard the
    optimizer state (FSDP, DeepSpeed ZeRO, ``ZeroRedundancyOptimizer``, DTensor parameters)
    would make rank zero see only its shard: the monitor detects them at ``on_train_start``,
    warns, and disables itself rather than log wrong numbers.

    Args:
        logging_interval: log after every ``logging_interval``-th optimizer step
            (``trainer.global_step % logging_interval == 0``). ``None`` follows the
            trainer's ``log_every_n_steps``. Default 50 (Lightning's default
            ``log_every_n_steps``); the overhead at 50 is measured in
            ``benchmarks/monitor_overhead.py``.
        track_moments: for M-SGD / M-SSD, keep a v~ buffer per parameter to log the γ
            M-SVAG would apply (see above for the cost). Ignored for other optimizers.
        per_tensor: log the per-tensor statistics; ``False`` logs only ``all``.
        histograms: write γ histograms to TensorBoard.
        num_bins: buckets of the displayed γ histogram on [0, 1]; must divide
            ``quantile_bins``.
        quantile_bins: fine bins on [0, 1] from which the quantiles are read (even).
        eta2_bins: bins of the log10 η̂² histogram on [−10, 10].
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
        self.logging_interval = logging_interval
        self.track_moments = bool(track_moments)
        self.per_tensor = bool(per_tensor)
        self.histograms = bool(histograms)
        self.num_bins = num_bins
        self.quantile_bins = quantile_bins
        self.eta2_bins = eta2_bins
        self._disabled: Optional[str] = None
        self._warned: set = set()
        self._last_logged_step = -1
        # track_moments: param -> (v~, own step count)
        self._tracked: Dict[Tensor, List[Any]] = {}

    # ------------------------------------------------------------------ helpers
    def _warn_once(self, key: Any, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=UserWarning)

    def _interval(self, trainer: "pl.Trainer") -> int:
        return self.logging_interval if self.logging_interval is not None else max(1, int(trainer.log_every_n_steps))

    @staticmethod
    def _sharding_reason(trainer: "pl.Trainer") -> Optional[str]:
        strategy = type(trainer.strategy).__name__
        if any(key in strategy for key in ("FSDP", "DeepSpeed", "ModelParallel")):
            return f"the {strategy} shards parameters and optimizer state across ranks"
        for optimizer in trainer.optimizers:
            if type(optimizer).__name__ == "ZeroRedundancyOptimizer":
                return "ZeroRedundancyOptimizer keeps each rank's shard of the optimizer state only"
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover - old torch
            return None
        model = trainer.lightning_module
        if model is not None and any(isinstance(p, DTensor) for p in model.parameters()):
            return "the parameters are DTensors (sharded across ranks)"
        return None

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._disabled = None
        self._tracked = {}
        self._last_logged_step = -1
        reason = self._sharding_reason(trainer)
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
        if self.histograms and self._tensorboard_writer(trainer) is None:
            self._warn_once(
                "no-tensorboard",
                "VarianceAdaptationMonitor: no TensorBoardLogger among the trainer's loggers; "
                "γ histograms are skipped (scalars are still logged).",
            )

    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Optimizer
    ) -> None:
        if not self.track_moments or self._disabled or not trainer.is_global_zero:
            return
        optimizer = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        if not self._is_untracked_dissected(optimizer):
            return
        for group in optimizer.param_groups:
            beta = group["beta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                entry = self._tracked.get(p)
                if entry is None:
                    entry = self._tracked[p] = [torch.zeros_like(p, memory_format=torch.preserve_format), 0]
                g = p.grad
                entry[0].mul_(beta).addcmul_(g, g, value=1.0 - beta)
                entry[1] += 1

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._disabled or not trainer.is_global_zero:
            return
        step = trainer.global_step
        if step == 0 or step == self._last_logged_step or step % self._interval(trainer):
            return
        self._last_logged_step = step
        scalars, hists = self.compute(pl_module, trainer.optimizers)
        if not scalars:
            return
        log_step = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        log_step = getattr(log_step, "_batches_that_stepped", step - 1)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=log_step)
        if self.histograms and hists:
            writer = self._tensorboard_writer(trainer)
            if writer is not None:
                for tag, h in hists.items():
                    writer.add_histogram_raw(
                        tag, h.min, h.max, h.num, h.sum, h.sum_squares, h.bucket_limits, h.bucket_counts,
                        global_step=log_step,
                    )

    # ------------------------------------------------------------------ reading optimizers
    @staticmethod
    def _tensorboard_writer(trainer: "pl.Trainer"):
        from pytorch_lightning.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment
                if hasattr(writer, "add_histogram_raw"):
                    return writer
        return None

    @staticmethod
    def _is_untracked_dissected(optimizer: Optimizer) -> bool:
        return isinstance(optimizer, DissectedOptimizer) and not optimizer.rule.variance_adaptation

    def _factors(self, optimizer: Optimizer) -> Optional[Iterable[Tuple[Tensor, Tensor, float, int]]]:
        """(param, γ, λ, power) per parameter with state, lazily; ``None`` if the optimizer is unreadable.

        γ = (1 + λ η̂²)^(−1/power) ties the factor to the relative variance η̂².
        """
        if isinstance(optimizer, DissectedOptimizer):
            if optimizer.rule.variance_adaptation:
                return self._dissected_factors(optimizer, optimizer.rule.direction, tracked=False)
            if self.track_moments:
                return self._dissected_factors(optimizer, "momentum", tracked=True)
            self._warn_once(
                ("untracked", type(optimizer)),
                f"VarianceAdaptationMonitor: {type(optimizer).__name__} keeps no second moment; pass "
                "track_moments=True to log the γ M-SVAG would apply (one extra buffer per parameter).",
            )
            return None
        if isinstance(optimizer, torch.optim.Adam) or type(optimizer).__name__ == "AdamW":
            return self._adam_factors(optimizer)
        self._warn_once(
            ("unreadable", type(optimizer)),
            f"VarianceAdaptationMonitor cannot read a variance-adaptation factor from {type(optimizer).__name__}; "
            "it is skipped (supported: MSVAG, SVAG, Adam/AdamW, and MSGD/MSSD with track_moments=True).",
        )
        return None

    def _dissected_factors(self, optimizer: DissectedOptimizer, direction: str, tracked: bool):
        for group in optimizer.param_groups:
            beta = group["beta"]
            for p in group["params"]:
                state = optimizer.state.get(p)
                if not state or "exp_avg" not in state:
                    continue
                k = int(state["step"].item())
                if k == 0:
                    continue
                m = state["exp_avg"]
                if tracked:
                    entry = self._tracked.get(p)
                    if entry is None or entry[1] == 0:
                        continue
                    v = entry[0]
                    if entry[1] != k:  # v~ started later (resume): re-weight to bias-correct with k
                        v = v * (bias_correction(beta, k) / bias_correction(beta, entry[1]))
                else:
                    v = state["exp_avg_sq"]
                gamma = variance_adaptation_factor(m, v, beta=beta, step=k, direction=direction)
                # M-SVAG: γ = 1/(1 + ρ η̂²); SVAG: γ = 1/(1 + η̂²)  (docs/algorithm.md §1)
                lam = variance_ratio(beta, k) if direction == "momentum" else 1.0
                yield p, gamma, lam, 1

    @staticmethod
    def _adam_factors(optimizer: Optimizer):
        for group in optimizer.param_groups:
            beta1, beta2 = (float(b) for b in group["betas"])
            for p in group["params"]:
                state = optimizer.state.get(p)
                if not state or "exp_avg" not in state:
                    continue
                k = int(float(state["step"]))
                if k == 0:
                    continue
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if m.dtype in _LOW_PRECISION or m.dtype != v.dtype:
                    m, v = m.float(), v.float()
                # (1 + η̂²)^(-1/2) = |m| / sqrt(max(v, m²)) with m = m~/bc1, v = v~/bc2; 0 where m = v = 0
                scale = math.sqrt(bias_correction(beta2, k)) / bias_correction(beta1, k)
                factor = m.abs().mul_(scale).div_(v.sqrt()).clamp_(max=1.0).nan_to_num_(nan=0.0)
                yield p, factor, 1.0, 2

    @torch.no_grad()
    def compute(
        self, pl_module: "pl.LightningModule", optimizers: Sequence[Optimizer]
    ) -> Tuple[Dict[str, float], Dict[str, HistogramData]]:
        """The scalars and histograms of one logging step, as ``(scalars, histograms)`` dicts.

        Usable without a trainer (``compute(model, [optimizer])``); the callback calls it on
        global rank zero.
        """
        names = {p: name for name, p in pl_module.named_parameters()}
        entries: List[Tuple[str, Tensor]] = []
        seen = set()
        for index, optimizer in enumerate(optimizers):
            optimizer = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
            factors = self._factors(optimizer)
            if factors is None:
                continue
            for p, gamma, lam, power in factors:
                if p in seen or p.numel() == 0:
                    continue
                seen.add(p)
                name = names.get(p)
                if name is None:
                    name = f"optimizer{index}.param{len(seen) - 1}"
                entries.append((name, self._tensor_stats(gamma, lam, power)))
        if not entries:
            return {}, {}
        # one device -> host copy per device
        host = [stats.cpu().numpy() for stats in _to_host([s for _, s in entries])]
        q, e = self.quantile_bins, self.eta2_bins
        scalars: Dict[str, float] = {}
        hists: Dict[str, HistogramData] = {}
        total = np.zeros(_N_MOMENTS + q + e)
        total[2], total[3] = math.inf, -math.inf
        for (name, _), stats in zip(entries, host):
            total[:2] += stats[:2]
            total[2] = min(total[2], stats[2])
            total[3] = max(total[3], stats[3])
            total[_N_MOMENTS:] += stats[_N_MOMENTS:]
            if self.per_tensor:
                self._summarise(name, stats, scalars, hists)
        self._summarise("all", total, scalars, hists)
        return scalars, hists

    def _tensor_stats(self, gamma: Tensor, lam: float, power: int) -> Tensor:
        """[Σγ, Σγ², min γ, max γ, fine γ histogram, log10 η̂² histogram] (float64, on γ's device).

        η̂² comes from γ through γ = (1 + λ η̂²)^(−1/power), i.e. η̂² = (γ^(−power) − 1)/λ
        (M-SVAG: λ = ρ, power 1; SVAG: λ = 1, power 1; Adam: λ = 1, power 2): the same
        quantity as computed from the moments, in a third of the memory passes. No host
        synchronisation here. The count and #(γ < 0.5) are read from the fine histogram
        (0.5 is a bin edge; ``torch.histc`` ignores NaN, which only a non-finite optimizer
        state produces, and then Σγ is NaN too).
        """
        gamma = gamma.reshape(-1)
        if gamma.dtype in _LOW_PRECISION:
            gamma = gamma.float()
        moments = torch.stack(
            [gamma.sum(dtype=torch.float64), torch.dot(gamma, gamma).double(), *torch.aminmax(gamma)]
        ).double()
        fine = _histc_exact(gamma, self.quantile_bins, 0.0, 1.0)
        eta2 = gamma.reciprocal()  # γ = 0 (m = 0) -> η̂² = ∞
        if power == 2:
            eta2.square_()
        eta2.sub_(1.0)
        if lam != 1.0:
            eta2.mul_(1.0 / lam)
        log_eta2 = eta2.clamp_(10.0**-ETA2_LOG10_RANGE, 10.0**ETA2_LOG10_RANGE).log10_()
        eta_hist = _histc_exact(log_eta2, self.eta2_bins, -ETA2_LOG10_RANGE, ETA2_LOG10_RANGE)
        return torch.cat([moments, fine, eta_hist])

    def _summarise(self, name: str, stats: np.ndarray, scalars: Dict[str, float], hists: Dict[str, HistogramData]):
        total, squares, vmin, vmax = (float(x) for x in stats[:_N_MOMENTS])
        q = self.quantile_bins
        fine = stats[_N_MOMENTS : _N_MOMENTS + q]
        count, below = float(fine.sum()), float(fine[: q // 2].sum())
        if count <= 0:
            return
        if not (math.isfinite(vmin) and math.isfinite(vmax)):  # NaN in a broken optimizer state
            vmin, vmax = 0.0, 1.0
        eta_hist = stats[_N_MOMENTS + q :]
        q10, median, q90 = histogram_quantiles(fine, 0.0, 1.0, (0.1, 0.5, 0.9), vmin, vmax)
        scalars[f"gamma/{name}/mean"] = total / count
        scalars[f"gamma/{name}/median"] = median
        scalars[f"gamma/{name}/q10"] = q10
        scalars[f"gamma/{name}/q90"] = q90
        scalars[f"gamma/{name}/frac_below_0.5"] = below / count
        (log_median,) = histogram_quantiles(eta_hist, -ETA2_LOG10_RANGE, ETA2_LOG10_RANGE, (0.5,))
        scalars[f"eta2/{name}/median"] = 10.0**log_median
        if self.histograms:
            counts = fine.reshape(self.num_bins, -1).sum(axis=1)
            nonzero = np.flatnonzero(counts)
            if len(nonzero):
                first, last = int(nonzero[0]), int(nonzero[-1])
                limits = np.linspace(0.0, 1.0, self.num_bins + 1)[1:]
                hists[f"gamma_hist/{name}"] = HistogramData(
                    min=vmin,
                    max=vmax,
                    num=count,
                    sum=total,
                    sum_squares=squares,
                    bucket_limits=limits[first : last + 1].tolist(),
                    bucket_counts=counts[first : last + 1].tolist(),
                )


def _to_host(tensors: List[Tensor]) -> List[Tensor]:
    """Copy device tensors to the host with one transfer per device."""
    by_device: Dict[torch.device, List[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    out: List[Optional[Tensor]] = [None] * len(tensors)
    for device, indices in by_device.items():
        if device.type == "cpu":
            for i in indices:
                out[i] = tensors[i]
            continue
        sizes = [tensors[i].numel() for i in indices]
        joined = torch.cat([tensors[i] for i in indices]).cpu()
        for i, part in zip(indices, joined.split(sizes)):
            out[i] = part
    return out  # type: ignore[return-value]
