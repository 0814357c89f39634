"""Shared plotting helpers for the ``reproduce`` experiments: one look for every figure.

* Agg backend (no display needed), figures saved at 150 dpi with a tight bounding box.
* One fixed colour and line style per method, so a method looks the same in every figure
  (sign-based methods dashed, non-sign methods solid, as the paper groups them).
* :func:`band` draws a mean line with a ± one standard deviation band.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Sequence

import matplotlib

if os.environ.get("MPLBACKEND") is None:  # never need a display; respect an explicit choice
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["DPI", "METHOD_LABELS", "method_color", "method_label", "method_style", "band", "new_figure", "save_figure"]

DPI = 150

#: Display names of the methods (paper spelling).
METHOD_LABELS: Dict[str, str] = {
    "m-sgd": "M-SGD",
    "m-ssd": "M-SSD",
    "m-svag": "M-SVAG",
    "svag": "SVAG",
    "adam": "Adam",
    "sgd": "SGD",
    "ssd": "SSD",
    "sign": "sign descent",
    "gd": "gradient descent",
    "m-ssd-va": "M-SSD-VA",
    "m-ssd-va-sqrt": "M-SSD-VA (√γ)",
    "m-svag-mb": "M-SVAG (mini-batch)",
    "svag-mb": "SVAG (mini-batch)",
}

#: Fixed colours (tab10): momentum variants of one family share a hue family.
_COLORS: Dict[str, str] = {
    "m-sgd": "#1f77b4",  # blue
    "sgd": "#1f77b4",
    "m-svag": "#2ca02c",  # green
    "svag": "#17becf",  # cyan
    "m-ssd": "#d62728",  # red
    "ssd": "#d62728",
    "sign": "#ff7f0e",  # orange
    "adam": "#9467bd",  # purple
    "gd": "#7f7f7f",  # grey
    "m-ssd-va": "#8c564b",  # brown
    "m-ssd-va-sqrt": "#e377c2",  # pink
    "m-svag-mb": "#bcbd22",  # olive
    "svag-mb": "#17becf",
}
_SIGN_BASED = {"m-ssd", "ssd", "sign", "adam", "m-ssd-va", "m-ssd-va-sqrt"}
_FALLBACK = ["#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]


def method_label(method: str) -> str:
    """The paper's spelling of a method name (unknown names are returned unchanged)."""
    return METHOD_LABELS.get(method.lower(), method)


def method_color(method: str) -> str:
    """The method's fixed colour (a stable fallback colour for unknown names)."""
    key = method.lower()
    if key in _COLORS:
        return _COLORS[key]
    return _FALLBACK[sum(map(ord, key)) % len(_FALLBACK)]


def method_style(method: str) -> str:
    """Dashed for sign-based methods (Adam, M-SSD, SSD, sign descent), solid otherwise."""
    return "--" if method.lower() in _SIGN_BASED else "-"


def new_figure(nrows: int = 1, ncols: int = 1, *, width: float = 5.0, height: float = 3.6, **kwargs):
    """``plt.subplots`` with a panel size in inches; always returns a 2-D array of axes."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kwargs)
    return fig, axes


def band(ax, x: Sequence[float], mean: Sequence[float], std: Optional[Sequence[float]] = None, *,
         method: Optional[str] = None, label: Optional[str] = None, color: Optional[str] = None,
         linestyle: Optional[str] = None, alpha: float = 0.2) -> None:
    """Plot ``mean`` against ``x`` and, if ``std`` is given, a shaded ``mean ± std`` band."""
    x = np.asarray(x, dtype=float)
    mean = np.asarray(mean, dtype=float)
    if method is not None:
        color = color or method_color(method)
        linestyle = linestyle or method_style(method)
        label = label if label is not None else method_label(method)
    (line,) = ax.plot(x, mean, color=color, linestyle=linestyle or "-", label=label, linewidth=1.6)
    if std is not None:
        std = np.asarray(std, dtype=float)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=alpha, linewidth=0)


def save_figure(fig, path: "str | Path") -> Path:
    """Save at :data:`DPI` with a tight bounding box, close the figure, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path
