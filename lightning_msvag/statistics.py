"""Statistics of variance-adaptation factors γ, from histograms (no Lightning).

Two stages, so that the device work is one pass per tensor and the host work is cheap:

1. :func:`reduce_factor` (on γ's device, no host synchronisation): the reductions of one
   tensor's γ as named fields — Σγ, Σγ², min, max, a fine histogram of γ on [0, 1] and a
   histogram of log10 η̂² on [−ETA2_LOG10_RANGE, ETA2_LOG10_RANGE]. On the host they become a
   :class:`Summary`; :meth:`Summary.merge` pools tensors (the model-wide ``all``) field by
   field, each field with its own merge rule.
2. :data:`STATISTICS`: one ``_extract_*`` function per logged value, ``Summary -> float``
   (a scalar) or ``-> HistogramData`` (a TensorBoard histogram), registered under a short
   name with its tag and whether it is logged by default.

Adding a statistic is one ``_extract_*`` function plus one :func:`statistic` line here.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ETA2_LOG10_RANGE", "HistogramData", "Summary", "Statistic", "STATISTICS", "statistic",
    "histogram_quantiles", "histc_exact", "reduce_factor",
]

#: η̂² is binned on a log10 scale over [10^-ETA2_LOG10_RANGE, 10^+ETA2_LOG10_RANGE].
ETA2_LOG10_RANGE = 10.0
#: Elements per ``torch.histc`` call: float32 bin counts stay exact below 2**24.
HISTC_CHUNK = 2**24

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# ====================================================================== histogram math
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


def histc_exact(x: Tensor, bins: int, low: float, high: float) -> Tensor:
    """``torch.histc`` in chunks of at most ``HISTC_CHUNK`` elements, summed in float64 (exact counts)."""
    flat = x.reshape(-1)
    if flat.numel() <= HISTC_CHUNK:
        return torch.histc(flat, bins=bins, min=low, max=high).double()
    hist = torch.zeros(bins, dtype=torch.float64, device=x.device)
    for chunk in flat.split(HISTC_CHUNK):
        hist += torch.histc(chunk, bins=bins, min=low, max=high).double()
    return hist


# ====================================================================== stage 1: reductions
def _first(values):
    return values[0]


@dataclass
class Summary:
    """The reductions of the γ of one tensor (or of several, merged): the input of every statistic.

    Each field names how it merges across tensors (``metadata["merge"]``, applied left to
    right). ``gamma_counts`` has ``quantile_bins`` equal bins on [0, 1] (0.5 is a bin edge;
    ``torch.histc`` ignores NaN, which only a non-finite optimizer state produces, and then
    ``sum`` is NaN too); ``log_eta2_counts`` has ``eta2_bins`` bins of log10 η̂² on
    [−ETA2_LOG10_RANGE, ETA2_LOG10_RANGE], where γ = 0 (m = 0) counts as η̂² = +∞ (top bin).
    ``num_bins`` is configuration, not data: the buckets of the displayed histogram.
    """

    sum: float = field(metadata={"merge": np.add})
    sum_squares: float = field(metadata={"merge": np.add})
    min: float = field(metadata={"merge": np.minimum})
    max: float = field(metadata={"merge": np.maximum})
    gamma_counts: np.ndarray = field(metadata={"merge": np.add})
    log_eta2_counts: np.ndarray = field(metadata={"merge": np.add})
    num_bins: int = field(default=50, metadata={"merge": None})

    @property
    def count(self) -> float:
        return float(self.gamma_counts.sum())

    @property
    def finite_range(self):
        """(min, max) of γ; (0, 1) if the state held NaN."""
        vmin, vmax = float(self.min), float(self.max)
        return (vmin, vmax) if math.isfinite(vmin) and math.isfinite(vmax) else (0.0, 1.0)

    def gamma_quantile(self, q: float) -> float:
        """Quantile of γ from the fine histogram: absolute error ≤ 1/quantile_bins."""
        return histogram_quantiles(self.gamma_counts, 0.0, 1.0, (q,), *self.finite_range)[0]

    def eta2_quantile(self, q: float) -> float:
        """Quantile of η̂² from the log10 histogram: relative error ≤ 10^(2·ETA2_LOG10_RANGE/eta2_bins) − 1."""
        (log_q,) = histogram_quantiles(self.log_eta2_counts, -ETA2_LOG10_RANGE, ETA2_LOG10_RANGE, (q,))
        return 10.0**log_q

    @classmethod
    def merge(cls, summaries: Sequence["Summary"]) -> "Summary":
        values = {}
        for f in fields(cls):
            rule = f.metadata["merge"] or _first
            column = [getattr(s, f.name) for s in summaries]
            values[f.name] = rule(column) if rule is _first else functools.reduce(rule, column)
        return cls(**values)


def reduce_factor(gamma: Tensor, lam: float, power: int, quantile_bins: int, eta2_bins: int) -> Dict[str, Tensor]:
    """The data fields of :class:`Summary` for one γ tensor, as float64 tensors on γ's device.

    η̂² comes from γ through γ = (1 + λ η̂²)^(−1/power), i.e. η̂² = (γ^(−power) − 1)/λ
    (M-SVAG: λ = ρ, power 1; SVAG: λ = 1, power 1; Adam: λ = 1, power 2): the same
    quantity as computed from the moments, in a third of the memory passes. About 15
    elementwise passes over γ, no host synchronisation.
    """
    gamma = gamma.reshape(-1)
    if gamma.dtype in _LOW_PRECISION:
        gamma = gamma.float()
    vmin, vmax = torch.aminmax(gamma)
    out = {
        "sum": gamma.sum(dtype=torch.float64),
        "sum_squares": torch.dot(gamma, gamma).double(),
        "min": vmin.double(),
        "max": vmax.double(),
        "gamma_counts": histc_exact(gamma, quantile_bins, 0.0, 1.0),
    }
    eta2 = gamma.reciprocal()  # γ = 0 (m = 0) -> η̂² = ∞
    if power == 2:
        eta2.square_()
    eta2.sub_(1.0)
    if lam != 1.0:
        eta2.mul_(1.0 / lam)
    log_eta2 = eta2.clamp_(10.0**-ETA2_LOG10_RANGE, 10.0**ETA2_LOG10_RANGE).log10_()
    out["log_eta2_counts"] = histc_exact(log_eta2, eta2_bins, -ETA2_LOG10_RANGE, ETA2_LOG10_RANGE)
    return out


# ====================================================================== stage 2: statistics
class Statistic(NamedTuple):
    """One logged value: ``tag`` (``{name}`` is the parameter's name, or ``all``), its extractor, on by default?"""

    tag: str
    extract: Callable[[Summary], Union[float, HistogramData, None]]
    default: bool


#: short name -> Statistic, in logging order. ``VarianceAdaptationMonitor(statistics=[...])`` picks by short name.
STATISTICS: Dict[str, Statistic] = {}


def statistic(name: str, tag: str, default: bool = True):
    """Register ``extract`` in :data:`STATISTICS` as ``name``, logged under ``tag``."""

    def register(extract):
        STATISTICS[name] = Statistic(tag, extract, default)
        return extract

    return register


@statistic("gamma_mean", "gamma/{name}/mean")
def _extract_gamma_mean(s: Summary) -> float:
    return float(s.sum) / s.count


@statistic("gamma_median", "gamma/{name}/median")
def _extract_gamma_median(s: Summary) -> float:
    return s.gamma_quantile(0.5)


@statistic("gamma_q10", "gamma/{name}/q10")
def _extract_gamma_q10(s: Summary) -> float:
    return s.gamma_quantile(0.1)


@statistic("gamma_q90", "gamma/{name}/q90")
def _extract_gamma_q90(s: Summary) -> float:
    return s.gamma_quantile(0.9)


@statistic("gamma_frac_below_0.5", "gamma/{name}/frac_below_0.5")
def _extract_gamma_frac_below_half(s: Summary) -> float:
    """Exact: 0.5 is an edge of the fine bins."""
    return float(s.gamma_counts[: len(s.gamma_counts) // 2].sum()) / s.count


@statistic("eta2_median", "eta2/{name}/median")
def _extract_eta2_median(s: Summary) -> float:
    return s.eta2_quantile(0.5)


@statistic("gamma_hist", "gamma_hist/{name}")
def _extract_gamma_hist(s: Summary) -> Optional[HistogramData]:
    """γ on [0, 1] in ``num_bins`` buckets (sums of groups of the fine bins), empty end buckets trimmed."""
    counts = s.gamma_counts.reshape(s.num_bins, -1).sum(axis=1)
    nonzero = np.flatnonzero(counts)
    if not len(nonzero):
        return None
    first, last = int(nonzero[0]), int(nonzero[-1])
    limits = np.linspace(0.0, 1.0, s.num_bins + 1)[1:]
    vmin, vmax = s.finite_range
    return HistogramData(
        min=vmin,
        max=vmax,
        num=s.count,
        sum=float(s.sum),
        sum_squares=float(s.sum_squares),
        bucket_limits=limits[first : last + 1].tolist(),
        bucket_counts=counts[first : last + 1].tolist(),
    )


def summarise(name: str, summary: Summary, names: Sequence[str], histograms: bool = True):
    """``(scalars, histograms)`` of the statistics ``names`` for one summary (nothing if it is empty).

    ``histograms=False`` drops every statistic that returns a :class:`HistogramData`.
    """
    scalars: Dict[str, float] = {}
    hists: Dict[str, HistogramData] = {}
    if summary.count <= 0:
        return scalars, hists
    for key in names:
        stat = STATISTICS[key]
        value = stat.extract(summary)
        if value is None:
            continue
        tag = stat.tag.format(name=name)
        if isinstance(value, HistogramData):
            if histograms:
                hists[tag] = value
        else:
            scalars[tag] = float(value)
    return scalars, hists
