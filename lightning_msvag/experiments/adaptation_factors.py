"""``reproduce factors`` — paper Fig. 3: variance adaptation factors as functions of the relative variance.

With η² = σ²/∇L² the relative variance of one gradient coordinate (docs/algorithm.md §1):

* ``erf(1/(√2 η))`` — the optimal factor for a *sign* update, 2 P[sign correct] − 1 (SSD, M-SSD);
* ``(1 + η²)^(−1/2)`` — the factor Adam implicitly applies: m/√v = sign(m)·|m|/√v and
  |m|/√v ≈ 1/√(1 + η²) since E[g²] = ∇L² + σ²;
* ``(1 + η²)^(−1)`` — the optimal factor for a *non-sign* update (Lemma 1, SVAG / M-SVAG).

Adam's factor approximates the optimal sign factor; the largest absolute gap between the
two is reported (a 1-D maximisation: a dense log-spaced grid, then golden-section refinement).

Outputs in ``--out``: ``factors.png``, ``factors.json`` (``max_gap``, ``eta_at_max_gap``, the
values of both factors there, and the grid) and ``factors.csv`` (eta and the three factors).
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Dict

import numpy as np

from ._common import prepare_out, write_csv, write_json
from .plotting import new_figure, save_figure

__all__ = ["sign_factor", "adam_factor", "svag_factor", "max_gap", "add_arguments", "run"]

_erf = np.vectorize(math.erf, otypes=[float])


def sign_factor(eta: "np.ndarray | float") -> np.ndarray:
    """Optimal sign-update factor ``erf(1/(√2 η))`` (η = 0 gives 1)."""
    eta = np.asarray(eta, dtype=float)
    with np.errstate(divide="ignore"):
        return _erf(1.0 / (math.sqrt(2.0) * eta))


def adam_factor(eta: "np.ndarray | float") -> np.ndarray:
    """Adam's implicit factor ``(1 + η²)^(−1/2)``."""
    eta = np.asarray(eta, dtype=float)
    return 1.0 / np.sqrt(1.0 + eta**2)


def svag_factor(eta: "np.ndarray | float") -> np.ndarray:
    """The non-sign (SVAG / M-SVAG) factor ``(1 + η²)^(−1)``."""
    eta = np.asarray(eta, dtype=float)
    return 1.0 / (1.0 + eta**2)


def _gap(log_eta: float) -> float:
    eta = 10.0**log_eta
    return abs(float(sign_factor(eta)) - float(adam_factor(eta)))


def max_gap(eta_min: float = 1e-3, eta_max: float = 1e3, points: int = 20001) -> Dict[str, float]:
    """Largest ``|erf(1/(√2η)) − (1+η²)^(−1/2)|`` over ``[eta_min, eta_max]``.

    Dense log-spaced grid, then golden-section search on log10 η in the bracket around the
    grid maximum (the gap is unimodal there), to ~1e-12 in log10 η.
    """
    log_grid = np.linspace(math.log10(eta_min), math.log10(eta_max), points)
    gaps = np.abs(sign_factor(10.0**log_grid) - adam_factor(10.0**log_grid))
    k = int(np.argmax(gaps))
    lo, hi = log_grid[max(k - 1, 0)], log_grid[min(k + 1, points - 1)]
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    for _ in range(200):
        if b - a < 1e-12:
            break
        if _gap(c) > _gap(d):
            b, d = d, c
            c = b - inv_phi * (b - a)
        else:
            a, c = c, d
            d = a + inv_phi * (b - a)
    best = max([(a + b) / 2.0, log_grid[k]], key=_gap)
    eta = 10.0**best
    return {
        "max_gap": _gap(best),
        "eta_at_max_gap": eta,
        "sign_factor_at_max_gap": float(sign_factor(eta)),
        "adam_factor_at_max_gap": float(adam_factor(eta)),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eta-min", type=float, default=1e-2, help="smallest η plotted (default 1e-2)")
    parser.add_argument("--eta-max", type=float, default=1e2, help="largest η plotted (default 1e2)")
    parser.add_argument("--points", type=int, default=2001, help="number of log-spaced η values (default 2001)")


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Compute the three factors, the largest sign/Adam gap, write the figure, JSON and CSV."""
    if not 0 < args.eta_min < args.eta_max:
        raise ValueError(f"need 0 < --eta-min < --eta-max, got {args.eta_min}, {args.eta_max}")
    if args.points < 3:
        raise ValueError(f"--points must be >= 3, got {args.points}")
    out = prepare_out(args.out)
    eta = np.logspace(math.log10(args.eta_min), math.log10(args.eta_max), args.points)
    f_sign, f_adam, f_svag = sign_factor(eta), adam_factor(eta), svag_factor(eta)
    # The gap is searched over the plotted range (the factors agree at both ends anyway).
    gap = max_gap(args.eta_min, args.eta_max)

    fig, axes = new_figure(1, 1, width=6.4, height=4.2)
    ax = axes[0, 0]
    ax.plot(eta, f_sign, color="#d62728", lw=2.0, label=r"optimal for sign update: erf$(1/(\sqrt{2}\,\eta))$")
    ax.plot(eta, f_adam, color="#9467bd", lw=2.0, ls="--", label=r"Adam's implicit factor: $(1+\eta^2)^{-1/2}$")
    ax.plot(eta, f_svag, color="#2ca02c", lw=2.0, ls="-.", label=r"optimal for non-sign update (M-SVAG): $(1+\eta^2)^{-1}$")
    ax.axvline(gap["eta_at_max_gap"], color="0.5", lw=0.8, ls=":")
    ax.annotate(
        f"largest gap sign vs Adam\n{gap['max_gap']:.3f} at η = {gap['eta_at_max_gap']:.3g}",
        xy=(gap["eta_at_max_gap"], 0.5 * (gap["sign_factor_at_max_gap"] + gap["adam_factor_at_max_gap"])),
        xytext=(-150, -60), textcoords="offset points", fontsize=8,
        arrowprops={"arrowstyle": "->", "color": "0.4"},
    )
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel(r"relative standard deviation $\eta = \sigma / |\nabla L|$ (log scale)")
    ax.set_ylabel("variance adaptation factor")
    ax.set_title("Variance adaptation factors vs. relative variance (paper Fig. 3)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, ncol=1, frameon=False)
    png = save_figure(fig, out / "factors.png")

    write_csv(out / "factors.csv", ["eta", "sign_factor", "adam_factor", "svag_factor"],
              zip(eta.tolist(), f_sign.tolist(), f_adam.tolist(), f_svag.tolist()))
    result = {
        "experiment": "factors",
        "formulas": {
            "sign_factor": "erf(1/(sqrt(2) eta))",
            "adam_factor": "(1 + eta^2)^(-1/2)",
            "svag_factor": "(1 + eta^2)^(-1)",
        },
        "eta_range": [args.eta_min, args.eta_max],
        "points": args.points,
        "seed": args.seed,
        **gap,
        "max_gap_sign_vs_svag": float(np.max(np.abs(f_sign - f_svag))),
    }
    write_json(out / "factors.json", result)
    print(f"factors: largest |erf(1/(sqrt2 eta)) - (1+eta^2)^-1/2| = {gap['max_gap']:.4f} "
          f"at eta = {gap['eta_at_max_gap']:.4g}; wrote {png}")
    return result
