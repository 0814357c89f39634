r"""``reproduce wilson`` — paper §5, Lemmas 2 and 3, on Wilson et al.'s (2017) least-squares instance.

**Construction** (Wilson et al. 2017, "The marginal value of adaptive gradient methods in machine
learning", §3.3). ``n`` training points with labels ``y_i ∈ {±1}``, ``P(y_i = +1) = p > ½``
(redrawn until there are strictly more +1 than −1 labels, which the property needs). Feature
vector ``x_i ∈ R^{3 + 5n}``: ``x_i1 = y_i``; ``x_i2 = x_i3 = 1``; and features unique to
example ``i`` in the block ``4 + 5(i−1) … 8 + 5(i−1)``: one 1 (the first entry) if ``y_i = +1``,
five 1s if ``y_i = −1``. Then ``Xᵀy = (n, n₊ − n₋, n₊ − n₋, y_i on each used unique
feature, 0 on unused ones)``, so ``sign(Xᵀy)`` is 1 on the first three features and ``y_i`` on the
unique ones, and row ``i`` of ``X sign(Xᵀy)`` is ``y_i + 2 + y_i · (#unique ones of i) = 4 y_i``:

    X sign(Xᵀy) = c y   with   c = 4        (checked numerically and reported as "c", "residual")

**Lemma 2/3** (docs/algorithm.md §2). For ``R(θ) = ‖Xθ − y‖² / (2n)`` started at ``θ0 = 0``, every iterate
of full-batch sign descent, M-SSD and Adam is a multiple of ``sign(Xᵀy)``: with ``θ = λ s``
the gradient is ``(λc − 1) Xᵀy / n``, whose sign is ``±s``, and Adam's ``m / √v`` of gradients
all ∝ ``Xᵀy`` is ``∝ s`` (exactly for ε = 0; ε = 1e-8 perturbs it by ~1e-8 relative). Gradient
methods (GD, M-SGD) stay in the row space of X instead, and M-SVAG's first step is a
gradient step (γ = 1 at k = 1), so it leaves the ``sign(Xᵀy)`` ray too.

**Generalisation.** Fresh points from the same construction carry ``y`` in feature 1, ones in
features 2–3 and their own, never-seen unique features (whose weights every method leaves at
0: their gradient is 0). A point is predicted as ``sign(xᵀθ)`` (0 counts as an error). For
``θ ∝ sign(Xᵀy)``, ``xᵀθ ∝ y + 2 > 0``: everything is predicted +1 and the error is the share of
negatives (≈ 1 − p) — the paper's point that the *sign* causes the poor generalisation.

Methods (full batch, float64, θ0 = 0, constant step sizes set by ``--lr-<method>``): ``adam``
(torch.optim.Adam, β = (0.9, 0.999), ε = 1e-8), ``sign`` (plain sign descent θ ← θ − α
sign(∇R)), ``m-ssd``, ``m-sgd``, ``m-svag`` (this package, β = 0.9) and ``gd`` (plain gradient
descent, reference). Outputs: ``wilson.json`` (construction check; per method: cosine between
θ_T and sign(Xᵀy), final training loss, test error and test loss on ``--test-points`` fresh
points) and ``wilson.png`` (training loss and cosine against iterations, test error per method).

The loss panel draws each method's *best loss so far*, ``min_{s ≤ t} R(θ_s)`` (floored at
1e-16), not ``R(θ_t)``: with a constant step size, sign descent and M-SSD cannot shrink their
step, so once near the minimum they jump around it (from iteration ~250 at the defaults, between
~1e-16 and 1e-5 to 1e-3), and drawn raw those jumps fill the panel and hide Adam's curve. The
legend gives, for such a method, the largest loss after its best; ``wilson.json`` keeps the
final raw loss.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ._common import prepare_out, write_json
from .plotting import method_color, method_label, method_style, new_figure, save_figure

__all__ = ["METHODS", "DEFAULT_LR", "LOSS_FLOOR", "wilson_data", "fresh_points", "run_method", "best_so_far", "plot",
           "add_arguments", "run"]

METHODS = ("adam", "sign", "m-ssd", "m-sgd", "m-svag", "gd")
#: Default constant step sizes (the sign-based ones move every coordinate by about α per step).
DEFAULT_LR = {"adam": 1e-3, "sign": 1e-3, "m-ssd": 1e-3, "m-sgd": 0.1, "m-svag": 0.1, "gd": 0.1}
SIGN_BASED = ("adam", "sign", "m-ssd")
#: Losses below this are drawn at it (float64 round-off: exact zeros cannot go on a log axis).
LOSS_FLOOR = 1e-16


def _labels(n: int, p: float, rng: np.random.Generator, require_majority: bool) -> np.ndarray:
    for _ in range(10_000):
        y = np.where(rng.random(n) < p, 1.0, -1.0)
        if not require_majority or y.sum() > 0:
            return y
    raise ValueError(f"could not draw {n} labels with more +1 than -1 at p = {p}; increase --p or --n")


def wilson_data(n: int, p: float, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """``(X [n, 3 + 5n], y [n])`` of the construction in the module doc."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.5 < p <= 1.0:
        raise ValueError(f"p must be in (0.5, 1], got {p}")
    y = _labels(n, p, rng, require_majority=True)
    x = np.zeros((n, 3 + 5 * n))
    x[:, 0] = y
    x[:, 1:3] = 1.0
    for i in range(n):
        start = 3 + 5 * i
        x[i, start : start + (1 if y[i] > 0 else 5)] = 1.0
    return x, y


def fresh_points(m: int, p: float, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Test points restricted to the three shared features ``(y, 1, 1)`` (their unique features are
    new dimensions with weight 0 for every method), and their labels."""
    y = _labels(m, p, rng, require_majority=False)
    return np.stack([y, np.ones(m), np.ones(m)], axis=1), y


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def _optimizer(method: str, params: List[torch.Tensor], lr: float):
    from lightning_msvag import build_optimizer

    if method == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    if method == "gd":
        return torch.optim.SGD(params, lr=lr)
    if method in ("m-ssd", "m-sgd", "m-svag"):
        return build_optimizer(method, params, lr=lr, beta=0.9, foreach=False, fused=False)
    raise ValueError(f"unknown method {method!r}")


def run_method(method: str, x: np.ndarray, y: np.ndarray, steps: int, lr: float) -> Dict[str, np.ndarray]:
    """Full-batch ``method`` on ``R(θ) = ‖Xθ − y‖²/(2n)`` from θ0 = 0; per-iteration loss, cosine and θ_T."""
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    n = len(y)
    s = np.sign(x.T @ y)
    theta = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = None if method == "sign" else _optimizer(method, [theta], lr)
    losses, cosines = np.empty(steps + 1), np.empty(steps + 1)
    for t in range(steps + 1):
        residual = xt @ theta - yt
        loss = residual.square().sum() / (2 * n)
        losses[t] = float(loss.detach())
        cosines[t] = _cosine(theta.detach().numpy(), s)
        if t == steps:
            break
        if method == "sign":
            (grad,) = torch.autograd.grad(loss, theta)
            with torch.no_grad():
                theta -= lr * torch.sign(grad)
        else:
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {"loss": losses, "cosine": cosines, "theta": theta.detach().numpy().copy()}


def best_so_far(loss: np.ndarray, floor: float = LOSS_FLOOR) -> np.ndarray:
    """``min_{s ≤ t} loss[s]`` for every ``t`` (never above ``loss[t]``, non-increasing), floored at ``floor``."""
    return np.maximum(np.minimum.accumulate(np.asarray(loss, dtype=float)), floor)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=50, help="training points (default 50; dimension 3 + 5n)")
    parser.add_argument("--p", type=float, default=0.7, help="P(y = +1), > 0.5 (default 0.7)")
    parser.add_argument("--steps", type=int, default=1000, help="full-batch iterations (default 1000)")
    parser.add_argument("--test-points", type=int, default=1000, help="fresh test points (default 1000)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods to run")
    for m in METHODS:
        parser.add_argument(f"--lr-{m}", type=float, default=DEFAULT_LR[m], help=f"step size of {m} (default {DEFAULT_LR[m]:g})")


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Build the instance, run every method, write ``wilson.json`` and ``wilson.png``."""
    if args.steps < 1 or args.test_points < 1:
        raise ValueError("need --steps >= 1 and --test-points >= 1")
    out = prepare_out(args.out)
    t0 = time.perf_counter()
    x, y = wilson_data(args.n, args.p, np.random.default_rng([args.seed, 0]))
    s = np.sign(x.T @ y)
    xs = x @ s
    c = float(xs @ y / (y @ y))
    residual = float(np.max(np.abs(xs - c * y)))
    x_test, y_test = fresh_points(args.test_points, args.p, np.random.default_rng([args.seed, 1]))

    torch.manual_seed(args.seed)  # nothing here is random in torch; kept for completeness
    results: Dict[str, Any] = {}
    traces: Dict[str, Dict[str, np.ndarray]] = {}
    for method in args.methods:
        lr = getattr(args, f"lr_{method.replace('-', '_')}")
        tr = run_method(method, x, y, args.steps, lr)
        traces[method] = tr
        theta = tr["theta"]
        score = x_test @ theta[:3]
        pred_correct = np.sign(score) == y_test
        results[method] = {
            "lr": lr,
            "sign_based": method in SIGN_BASED,
            "cosine_to_sign_Xty": float(tr["cosine"][-1]),
            "min_cosine_over_iterations": float(np.min(tr["cosine"][1:])),
            "train_loss": float(tr["loss"][-1]),
            "test_error": float(1.0 - pred_correct.mean()),
            "test_loss": float(0.5 * np.mean((score - y_test) ** 2)),
            "theta_shared_features": theta[:3].tolist(),
        }
    neg_share = float(np.mean(y_test < 0))
    result = {
        "experiment": "wilson",
        "settings": {"n": args.n, "p": args.p, "dim": int(x.shape[1]), "steps": args.steps,
                     "test_points": args.test_points, "seed": args.seed, "theta0": "zeros",
                     "loss": "R(theta) = ||X theta - y||^2 / (2n)"},
        "construction": {"c": c, "residual": residual, "n_positive": int((y > 0).sum()),
                         "n_negative": int((y < 0).sum())},
        "test_negative_share": neg_share,
        "lemma3_prediction": "cosine 1 for adam, sign, m-ssd (sign-based); below 1 for m-sgd, m-svag, gd",
        "methods": results,
        "wall_time_s": time.perf_counter() - t0,
    }
    write_json(out / "wilson.json", result)
    plot(traces, results, args, neg_share, out / "wilson.png")
    print(f"wilson: X sign(X^T y) = c y with c = {c:g} (max residual {residual:.1e}); "
          f"share of negatives in the test set {neg_share:.3f}")
    for m, r in results.items():
        print(f"  {m:7s} lr {r['lr']:<8g} cos {r['cosine_to_sign_Xty']:.6f}  train loss {r['train_loss']:.3e}  "
              f"test error {r['test_error']:.3f}")
    return result


def _rebound(loss: np.ndarray, best: float) -> Optional[float]:
    """The largest loss after the method's best iterate, if it climbs back over 10× that best."""
    after = float(np.max(loss[int(np.argmin(loss)):]))
    return after if after > 10 * max(best, LOSS_FLOOR) else None


def plot(traces, results, args, neg_share, path) -> Dict[str, np.ndarray]:
    """Draw ``wilson.png``; return the loss panel's curves as drawn (method -> y values)."""
    fig, axes = new_figure(1, 3, width=4.8, height=3.8)
    it = np.arange(args.steps + 1)
    drawn: Dict[str, np.ndarray] = {}
    for k, (m, tr) in enumerate(traces.items()):
        label = f"{method_label(m)} (α={results[m]['lr']:g})"
        curve = best_so_far(tr["loss"])
        rebound = _rebound(tr["loss"], float(curve[-1]))
        # Methods share curves here (sign descent = M-SSD until the minimum, cosine 1 for all
        # sign-based ones, GD ≈ M-SGD): each line is drawn thinner than the one before it, so
        # the earlier ones still show as a border.
        kw = dict(color=method_color(m), ls=method_style(m), lw=1.2 + 0.35 * (len(traces) - 1 - k))
        (line,) = axes[0, 0].plot(it, curve, label=label + (f"; after its best, up to {rebound:.0e}" if rebound else ""),
                                  **kw)
        drawn[m] = np.asarray(line.get_ydata(), dtype=float)
        axes[0, 1].plot(it[1:], tr["cosine"][1:], label=label, **kw)
    ax = axes[0, 0]
    ax.set_yscale("log")
    ax.set_ylim(bottom=LOSS_FLOOR / 3)
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"best training loss so far, min over s ≤ t\n(‖Xθ_s − y‖²/(2n), floored at {LOSS_FLOOR:g})",
                  fontsize=9)
    ax.set_title("Training loss (full batch), best so far")
    ax.grid(True, alpha=0.3)
    ax = axes[0, 1]
    ax.set_xlabel("iteration")
    ax.set_ylabel("cosine(θ_t, sign(Xᵀy))")
    ax.set_title("Alignment with sign(Xᵀy)\n(Lemma 3: exactly 1 for sign-based methods)", fontsize=10)
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.05)
    ax.grid(True, alpha=0.3)
    ax = axes[0, 2]
    names = list(results)
    errs = [results[m]["test_error"] for m in names]
    ax.bar(range(len(names)), errs, color=[method_color(m) for m in names])
    for k, e in enumerate(errs):
        ax.text(k, e, f"{e:.2f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(neg_share, color="0.3", ls=":", lw=1, label=f"share of negatives ({neg_share:.2f})")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([method_label(m) for m in names], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("classification error on fresh points")
    ax.set_title(f"Test error ({args.test_points} fresh points)", fontsize=10)
    ax.set_ylim(0, max(0.05, max(errs + [neg_share]) * 1.3))
    ax.legend(fontsize=8, loc="upper right")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"Wilson et al. least squares (n = {args.n}, p = {args.p:g}, d = {3 + 5 * args.n}), θ0 = 0, "
                 f"{args.steps} full-batch steps, seed {args.seed}", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    save_figure(fig, path)
    return drawn
