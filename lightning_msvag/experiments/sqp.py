r"""``reproduce sqp`` — paper Fig. 2 and §2.1: SGD vs. SSD on stochastic quadratic problems.

**Problem** (docs/algorithm.md §2). ``ℓ(θ; x) = ½ (θ − x)ᵀ Q (θ − x)`` with ``x ~ N(x*, ν² I)``, so the
stochastic gradient is ``g = Q(θ − x) ~ N(∇L, ν² QQ)`` with ``∇L = Q(θ − x*)``, and
``L(θ) = ½ (θ − x*)ᵀ Q (θ − x*) + ν²/2 · tr(Q)``. Dimension ``d`` (paper: 100). Spectra:
*well-conditioned* — eigenvalues i.i.d. uniform on [0.1, 1.1]; *ill-conditioned* — 90 %
uniform on [0, 1], 10 % uniform on [30, 60]. Bases: *axis-aligned* ``Q = Λ``, *rotated*
``Q = R Λ Rᵀ`` with ``R`` Haar-uniform (QR of a standard Gaussian matrix, columns
multiplied by the signs of ``diag(R_qr)``; the same ``Λ`` for both bases of a spectrum).
Noise ``ν ∈ {0, 0.1, 4.0}``. ``x* = 0``; every run starts from the same ``θ0 ~ N(0, I)``.

**Reported loss.** The *excess* loss ``L(θ) − ν²/2 · tr(Q) = ½ (θ − x*)ᵀ Q (θ − x*)`` (the
constant noise floor is subtracted so that all noise levels share a log axis; add it back
with ``sqp.json["matrices"][...]["trace"]``).

**Methods** with the locally optimal step size of Eq. 12, ``α* = −∇Lᵀ E[z] / E[zᵀ Q z]``,
recomputed at every iterate, followed by ``θ ← θ + α* z`` with ``z`` drawn with fresh noise:

* SGD, ``z = −g``: ``E[z] = −∇L`` and ``E[zᵀQz] = ∇LᵀQ∇L + ν² tr(Q³)`` — exact.
* SSD, ``z = −sign(g)``: ``E[sign g_i] = erf(∇L_i / (√2 σ_i))`` with ``σ_i² = ν² (QQ)_ii``
  (``sign(∇L_i)`` if ``σ_i = 0``) — exact. ``E[zᵀQz] = Σ_ij Q_ij E[s_i s_j]`` with ``s = sign g``:
  ``E[s_i²] = 1``; for ``i ≠ j`` with correlation ``ρ = (QQ)_ij / ((QQ)_ii (QQ)_jj)^½``,
  ``E[s_i s_j] = 4 Φ₂(h_i, h_j; ρ) − 2Φ(h_i) − 2Φ(h_j) + 1`` with ``h = ∇L/σ``. The bivariate
  normal orthant probability ``Φ₂`` has no elementary closed form for non-zero means; it is
  computed from Plackett's identity ``∂Φ₂/∂ρ = φ₂`` with the substitution ``r = sin t``::

      Φ₂(h, k; ρ) = Φ(h) Φ(k) + 1/(2π) ∫₀^{arcsin ρ} exp(−(h² − 2hk sin t + k²) / (2 cos² t)) dt

  whose integrand is smooth and bounded by 1/(2π); ``--quad-nodes`` Gauss–Legendre nodes
  (default 32). The tests check it against 512 nodes (1e-12), the exact zero-mean value
  ``1/4 + arcsin(ρ)/(2π)`` and the ρ = 0 product (1e-13), and a Monte Carlo estimate (within
  its standard error); at d = 100 the figure's numbers do not change with 64 nodes.
  Axis-aligned problems have ``ρ = 0`` and use the product ``E[s_i] E[s_j]`` exactly.
  ``--ssd-moment mc`` replaces the integral by a Monte Carlo estimate from ``--mc-samples``
  gradient draws per step (seeded by ``--seed``).

**§2.1 quantities** (noise-free case, per matrix, in ``sqp.json["matrices"]``). The improvement
``L(θ) − L(θ + α* z)`` of one step along ``z`` with its optimal step is ``(∇Lᵀz)² / (2 zᵀQz)``:

* ``I_SGD = ‖∇L‖₂⁴ / (2 ∇LᵀQ∇L) ≥ ‖∇L‖₂² / (2 λ_max)``;
* ``I_SSD = ‖∇L‖₁² / (2 sign(∇L)ᵀ Q sign(∇L))``. Since ``sign(∇L)ᵀQ sign(∇L) ≤ Σ_ij |Q_ij|
  = Σ_i |Q_ii| / pdiag(Q)`` and ``Σ_i |Q_ii| = tr Q ≤ d λ_max`` (Q is positive semi-definite),
  ``I_SSD ≥ pdiag(Q) ‖∇L‖₁² / (2 Σ_i |Q_ii|) ≥ pdiag(Q) ‖∇L‖₁² / (2 d λ_max)``,
* ``pdiag(Q) = Σ_i |Q_ii| / Σ_ij |Q_ij|`` (fraction of the absolute mass on the diagonal).

Written out: ``pdiag``, ``lambda_max``, ``trace``; at ``θ0``: ``I_SGD``, ``I_SGD_bound``
(‖∇L‖₂²/(2λ_max)), ``I_SSD``, ``I_SSD_bound`` (pdiag ‖∇L‖₁²/(2 d λ_max)) and
``I_SSD_bound_trace`` (pdiag ‖∇L‖₁²/(2 tr Q)); and the same averaged over ``--probe-points``
random ``θ − x* ~ N(0, I)``. Comparing the two bounds: SSD's can beat SGD's by up to a factor
``pdiag · ‖∇L‖₁² / (d ‖∇L‖₂²) ≤ pdiag`` — large only for a diagonally concentrated Q and a
dense gradient (axis-aligned problems have pdiag = 1; random rotations make it small).
(This derivation follows the paper's §2.1 argument; it is stated here in full because the
constants were re-derived rather than copied.)

**Outputs** in ``--out``: ``sqp.csv`` (spectrum, basis, noise, method, step, loss = mean excess
loss over ``--repeats`` runs, loss_std), ``sqp_runs.csv`` (one row per run and step),
``sqp.png`` (4 × 3 grid like Fig. 2: rows spectrum × basis, columns noise), ``sqp.json``
(settings, §2.1 quantities per matrix, final losses and the winner per panel).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ._common import prepare_out, write_csv, write_json
from .plotting import method_color, method_style, new_figure, save_figure

__all__ = [
    "CONDITIONINGS", "BASES", "NOISES", "METHODS",
    "eigenvalues", "random_rotation", "make_matrix", "pdiag",
    "improvement_quantities", "sign_mean", "sign_second_moment", "bivariate_orthant",
    "sgd_optimal_step", "ssd_optimal_step", "run_method", "add_arguments", "run",
]

CONDITIONINGS = ("well-conditioned", "ill-conditioned")
BASES = ("axis-aligned", "rotated")
NOISES = (0.0, 0.1, 4.0)
METHODS = ("sgd", "ssd")
_LABEL = {"sgd": "SGD", "ssd": "SSD"}
_SQRT2 = math.sqrt(2.0)
_erf = np.vectorize(math.erf, otypes=[float])


# ----------------------------------------------------------------------------- problems
def eigenvalues(spectrum: str, d: int, rng: np.random.Generator) -> np.ndarray:
    """Eigenvalues of the two spectra of docs/algorithm.md §2 (drawn i.i.d., returned sorted ascending)."""
    if spectrum == "well-conditioned":
        lam = rng.uniform(0.1, 1.1, size=d)
    elif spectrum == "ill-conditioned":
        n_large = int(round(0.1 * d))
        lam = np.concatenate([rng.uniform(0.0, 1.0, size=d - n_large), rng.uniform(30.0, 60.0, size=n_large)])
    else:
        raise ValueError(f"unknown spectrum {spectrum!r}; known: {', '.join(CONDITIONINGS)}")
    return np.sort(lam)


def random_rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-uniform orthogonal matrix: QR of a Gaussian matrix with the sign correction.

    (With ``det = −1`` one column is flipped, giving a rotation; ``R Λ Rᵀ`` is unaffected.)
    """
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def make_matrix(lam: np.ndarray, basis: str, rng: np.random.Generator) -> np.ndarray:
    """``Q = diag(λ)`` (axis-aligned) or ``R diag(λ) Rᵀ`` (rotated, R Haar-uniform), symmetrised."""
    if basis == "axis-aligned":
        return np.diag(lam)
    if basis == "rotated":
        rot = random_rotation(len(lam), rng)
        q = (rot * lam) @ rot.T
        return 0.5 * (q + q.T)
    raise ValueError(f"unknown basis {basis!r}; known: {', '.join(BASES)}")


def pdiag(q: np.ndarray) -> float:
    """Fraction of absolute mass on the diagonal: ``Σ_i |Q_ii| / Σ_ij |Q_ij|``."""
    return float(np.abs(np.diag(q)).sum() / np.abs(q).sum())


def improvement_quantities(q: np.ndarray, grad: np.ndarray) -> Dict[str, float]:
    """§2.1 one-step improvements at gradient ``grad`` (noise-free) and their bounds (module doc)."""
    d = len(grad)
    lam_max = float(np.linalg.eigvalsh(q)[-1])
    g2 = float(grad @ grad)
    g1 = float(np.abs(grad).sum())
    s = np.sign(grad)
    pd = pdiag(q)
    return {
        "I_SGD": g2**2 / (2.0 * float(grad @ q @ grad)),
        "I_SGD_bound": g2 / (2.0 * lam_max),
        "I_SSD": g1**2 / (2.0 * float(s @ q @ s)),
        "I_SSD_bound": pd * g1**2 / (2.0 * d * lam_max),
        "I_SSD_bound_trace": pd * g1**2 / (2.0 * float(np.abs(np.diag(q)).sum())),
        "l1_l2_ratio": g1**2 / (d * g2),
    }


# ----------------------------------------------------------------------- sign moments
def _phi_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + _erf(np.asarray(x, dtype=float) / _SQRT2))


def sign_mean(mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """``E[sign g]`` for ``g_i ~ N(mu_i, sigma_i²)``: ``erf(mu/(√2 σ))``, ``sign(mu)`` where σ = 0."""
    mu = np.asarray(mu, dtype=float)
    sigma = np.asarray(sigma, dtype=float)
    out = np.sign(mu)
    pos = sigma > 0
    out[pos] = _erf(mu[pos] / (_SQRT2 * sigma[pos]))
    return out


_GL_CACHE: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}


def bivariate_orthant(h: np.ndarray, k: np.ndarray, rho: np.ndarray, nodes: int = 32) -> np.ndarray:
    """``Φ₂(h, k; ρ) = P(X ≤ h, Y ≤ k)`` for standard bivariate normals with correlation ρ (vectorised).

    Plackett's identity with ``r = sin t`` (module doc): ``Φ(h)Φ(k) + (1/2π) ∫₀^{arcsin ρ}
    exp(−(h² − 2hk sin t + k²)/(2cos² t)) dt`` by Gauss–Legendre quadrature with ``nodes`` nodes.
    """
    h, k, rho = np.broadcast_arrays(np.asarray(h, float), np.asarray(k, float), np.clip(np.asarray(rho, float), -1, 1))
    if nodes not in _GL_CACHE:
        _GL_CACHE[nodes] = np.polynomial.legendre.leggauss(nodes)
    x, w = _GL_CACHE[nodes]
    upper = np.arcsin(rho)[..., None]
    t = 0.5 * upper * (x + 1.0)  # nodes mapped to [0, arcsin ρ]
    sin_t, cos2_t = np.sin(t), np.cos(t) ** 2
    hh, kk = h[..., None], k[..., None]
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        expo = -(hh * hh - 2.0 * hh * kk * sin_t + kk * kk) / (2.0 * cos2_t)
        integrand = np.where(cos2_t > 0, np.exp(expo), 0.0)
    integral = 0.5 * upper[..., 0] * (integrand * w).sum(-1)
    return _phi_cdf(h) * _phi_cdf(k) + integral / (2.0 * math.pi)


def sign_second_moment(mu: np.ndarray, cov: np.ndarray, *, method: str = "quadrature", nodes: int = 32,
                       samples: int = 4000, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """``M = E[sign(g) sign(g)ᵀ]`` for ``g ~ N(mu, cov)``; diagonal exactly 1 (module doc).

    Coordinates with zero variance are deterministic (``sign(mu_i)``); uncorrelated pairs use
    the exact product of the means; the rest use :func:`bivariate_orthant` (``method=
    "quadrature"``) or ``samples`` Monte Carlo draws from ``rng`` (``method="mc"``).
    """
    mu = np.asarray(mu, dtype=float)
    d = len(mu)
    sigma = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    mean = sign_mean(mu, sigma)
    m = np.outer(mean, mean)  # exact where the pair is independent (incl. a deterministic member)
    random = sigma > 0
    idx = np.flatnonzero(random)
    if len(idx) >= 2:
        sub_cov = cov[np.ix_(idx, idx)]
        rho = sub_cov / np.outer(sigma[idx], sigma[idx])
        iu = np.triu_indices(len(idx), 1)
        corr = rho[iu]
        dep = np.abs(corr) > 1e-15
        if np.any(dep):
            a, b = idx[iu[0][dep]], idx[iu[1][dep]]
            if method == "quadrature":
                ha, hb = mu[a] / sigma[a], mu[b] / sigma[b]
                # sign +1 ⇔ g > 0 ⇔ −Z < h with Z standard: P(s_a=+, s_b=+) = Φ₂(h_a, h_b; ρ).
                p_pp = bivariate_orthant(ha, hb, corr[dep], nodes)
                val = 4.0 * p_pp - 2.0 * _phi_cdf(ha) - 2.0 * _phi_cdf(hb) + 1.0
            elif method == "mc":
                if rng is None:
                    raise ValueError("method='mc' needs an rng")
                chol = np.linalg.cholesky(sub_cov + 1e-12 * np.eye(len(idx)) * np.trace(sub_cov) / len(idx))
                draws = np.sign(mu[idx] + rng.standard_normal((samples, len(idx))) @ chol.T)
                emp = draws.T @ draws / samples
                val = emp[iu[0][dep], iu[1][dep]]
            else:
                raise ValueError(f"unknown method {method!r}; use 'quadrature' or 'mc'")
            m[a, b] = val
            m[b, a] = val
    np.fill_diagonal(m, 1.0)
    return m


# ------------------------------------------------------------------------ step sizes
def sgd_optimal_step(q: np.ndarray, grad: np.ndarray, nu: float, tr_q3: float) -> float:
    """Eq. 12 for ``z = −g``: ``∇Lᵀ∇L / (∇LᵀQ∇L + ν² tr(Q³))`` (0 at a stationary point)."""
    num = float(grad @ grad)
    den = float(grad @ q @ grad) + nu**2 * tr_q3
    return num / den if den > 0 else 0.0


def ssd_optimal_step(q: np.ndarray, grad: np.ndarray, cov: np.ndarray, **moment_kw: Any) -> float:
    """Eq. 12 for ``z = −sign(g)``: ``∇Lᵀ E[sign g] / Σ_ij Q_ij E[s_i s_j]``."""
    sigma = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    num = float(grad @ sign_mean(grad, sigma))
    den = float((q * sign_second_moment(grad, cov, **moment_kw)).sum())
    return num / den if den > 0 else 0.0


def run_method(method: str, q: np.ndarray, nu: float, theta0: np.ndarray, steps: int, rng: np.random.Generator,
               *, x_star: Optional[np.ndarray] = None, moment: str = "quadrature", nodes: int = 32,
               mc_samples: int = 4000) -> Tuple[np.ndarray, np.ndarray]:
    """Run SGD or SSD with locally optimal steps; returns ``(excess losses [steps+1], step sizes [steps])``."""
    x_star = np.zeros_like(theta0) if x_star is None else x_star
    qq = q @ q
    cov = nu**2 * qq
    tr_q3 = float(np.trace(qq @ q))
    theta = theta0.copy()
    losses = np.empty(steps + 1)
    alphas = np.empty(steps)
    for t in range(steps + 1):
        diff = theta - x_star
        grad = q @ diff
        losses[t] = 0.5 * float(diff @ grad)
        if t == steps:
            break
        # One noisy gradient: x = x* + ν ε  ⇒  g = Q(θ − x) = ∇L − ν Q ε.
        g = grad - nu * (q @ rng.standard_normal(len(theta))) if nu > 0 else grad
        if method == "sgd":
            alpha = sgd_optimal_step(q, grad, nu, tr_q3)
            theta = theta - alpha * g
        elif method == "ssd":
            alpha = ssd_optimal_step(q, grad, cov, method=moment, nodes=nodes, samples=mc_samples, rng=rng)
            theta = theta - alpha * np.sign(g)
        else:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
        alphas[t] = alpha
    return losses, alphas


# ------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dim", type=int, default=100, help="problem dimension d (paper: 100)")
    parser.add_argument("--steps", type=int, default=100, help="iterations per run (default 100)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="independent noise realisations per panel and method (default 5; mean and min-max shown)")
    parser.add_argument("--noises", type=float, nargs="+", default=list(NOISES), help="noise levels ν (default 0 0.1 4)")
    parser.add_argument("--ssd-moment", choices=("quadrature", "mc"), default="quadrature",
                        help="how E[sign g_i sign g_j] is computed for correlated pairs (default quadrature)")
    parser.add_argument("--quad-nodes", type=int, default=32, help="Gauss-Legendre nodes for the orthant integral")
    parser.add_argument("--mc-samples", type=int, default=4000, help="draws per step for --ssd-moment mc")
    parser.add_argument("--probe-points", type=int, default=1000,
                        help="random points for the averaged §2.1 quantities (default 1000)")


def _panel_key(spectrum: str, basis: str, noise: float) -> str:
    return f"{spectrum}/{basis}/noise={noise:g}"


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Build the four matrices, run both methods on all 12 panels, write CSV, figure and JSON."""
    if args.dim < 2 or args.steps < 1 or args.repeats < 1:
        raise ValueError("need --dim >= 2, --steps >= 1, --repeats >= 1")
    if any(n < 0 for n in args.noises):
        raise ValueError("noise levels must be >= 0")
    out = prepare_out(args.out)
    t_start = time.perf_counter()
    d, noises = args.dim, [float(n) for n in args.noises]
    theta0 = np.random.default_rng([args.seed, 0]).standard_normal(d)
    x_star = np.zeros(d)

    matrices: Dict[Tuple[str, str], np.ndarray] = {}
    matrix_info: Dict[str, Any] = {}
    probe = np.random.default_rng([args.seed, 3]).standard_normal((args.probe_points, d))
    for si, spectrum in enumerate(CONDITIONINGS):
        lam = eigenvalues(spectrum, d, np.random.default_rng([args.seed, 1, si]))
        for bi, basis in enumerate(BASES):
            q = make_matrix(lam, basis, np.random.default_rng([args.seed, 2, si, bi]))
            matrices[spectrum, basis] = q
            at_start = improvement_quantities(q, q @ (theta0 - x_star))
            probes = [improvement_quantities(q, q @ p) for p in probe] if args.probe_points > 0 else []
            averaged = {k: float(np.mean([p[k] for p in probes])) for k in at_start} if probes else {}
            matrix_info[f"{spectrum}/{basis}"] = {
                "spectrum": spectrum,
                "basis": basis,
                "pdiag": pdiag(q),
                "lambda_min": float(lam.min()),
                "lambda_max": float(lam.max()),
                "condition_number": float(lam.max() / lam.min()) if lam.min() > 0 else float("inf"),
                "trace": float(np.trace(q)),
                "at_theta0": at_start,
                "mean_over_random_points": averaged,
                "I_SSD_over_I_SGD_at_theta0": at_start["I_SSD"] / at_start["I_SGD"],
                "I_SSD_bound_over_I_SGD_bound_at_theta0": at_start["I_SSD_bound"] / at_start["I_SGD_bound"],
            }

    curves: Dict[Tuple[str, str, float, str], np.ndarray] = {}
    run_rows: List[tuple] = []
    for si, spectrum in enumerate(CONDITIONINGS):
        for bi, basis in enumerate(BASES):
            q = matrices[spectrum, basis]
            for ni, nu in enumerate(noises):
                for mi, method in enumerate(METHODS):
                    reps = []
                    for r in range(args.repeats):
                        rng = np.random.default_rng([args.seed, 4, si, bi, ni, mi, r])
                        losses, _ = run_method(method, q, nu, theta0, args.steps, rng, x_star=x_star,
                                               moment=args.ssd_moment, nodes=args.quad_nodes,
                                               mc_samples=args.mc_samples)
                        reps.append(losses)
                        run_rows.extend((spectrum, basis, nu, method, r, t, float(v)) for t, v in enumerate(losses))
                    curves[spectrum, basis, nu, method] = np.array(reps)

    rows = []
    for (spectrum, basis, nu, method), reps in curves.items():
        mean, std = reps.mean(0), reps.std(0)
        rows.extend((spectrum, basis, nu, method, t, float(mean[t]), float(std[t])) for t in range(reps.shape[1]))
    write_csv(out / "sqp.csv", ["spectrum", "basis", "noise", "method", "step", "loss", "loss_std"], rows)
    write_csv(out / "sqp_runs.csv", ["spectrum", "basis", "noise", "method", "repeat", "step", "loss"], run_rows)

    # Final loss: mean over repeats of the mean over the last 10 % of iterates (smooths the noise).
    tail = max(1, int(round(0.1 * args.steps)))
    panels = {}
    for spectrum in CONDITIONINGS:
        for basis in BASES:
            for nu in noises:
                final = {m: float(curves[spectrum, basis, nu, m][:, -tail:].mean()) for m in METHODS}
                ratio = final["ssd"] / final["sgd"] if final["sgd"] > 0 else float("inf")
                panels[_panel_key(spectrum, basis, nu)] = {
                    "spectrum": spectrum, "basis": basis, "noise": nu,
                    "final_loss": final,
                    "ssd_over_sgd": ratio,
                    "winner": "ssd" if final["ssd"] < final["sgd"] else "sgd",
                }

    _plot(curves, noises, args, out / "sqp.png")
    result = {
        "experiment": "sqp",
        "settings": {
            "dim": d, "steps": args.steps, "repeats": args.repeats, "noises": noises, "seed": args.seed,
            "ssd_moment": args.ssd_moment, "quad_nodes": args.quad_nodes, "mc_samples": args.mc_samples,
            "x_star": "zeros", "theta0": "N(0, I) with the seed",
            "loss": "excess loss L(theta) - nu^2/2 tr(Q) = 1/2 (theta - x*)^T Q (theta - x*)",
            "final_loss": f"mean over repeats of the mean over the last {tail} iterates",
        },
        "matrices": matrix_info,
        "panels": panels,
        "wall_time_s": time.perf_counter() - t_start,
    }
    write_json(out / "sqp.json", result)
    for key, p in panels.items():
        print(f"sqp {key:45s} SGD {p['final_loss']['sgd']:.3e}  SSD {p['final_loss']['ssd']:.3e}  winner {p['winner']}")
    return result


def _plot(curves, noises, args, path) -> None:
    rows = [(s, b) for s in CONDITIONINGS for b in BASES]
    fig, axes = new_figure(len(rows), len(noises), width=3.9, height=2.9, sharex=True)
    steps = np.arange(args.steps + 1)
    for r, (spectrum, basis) in enumerate(rows):
        for c, nu in enumerate(noises):
            ax = axes[r, c]
            for method in METHODS:
                reps = curves[spectrum, basis, nu, method]
                color, ls = method_color(method), method_style(method)
                ax.plot(steps, reps.mean(0), color=color, ls=ls, lw=1.6, label=f"{_LABEL[method]} (optimal α)")
                if reps.shape[0] > 1:
                    ax.fill_between(steps, reps.min(0), reps.max(0), color=color, alpha=0.2, lw=0)
            ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.3)
            if r == 0:
                ax.set_title(f"noise ν = {nu:g}", fontsize=10)
            if c == 0:
                ax.set_ylabel(f"{spectrum}\n{basis}\nexcess loss", fontsize=9)
            if r == len(rows) - 1:
                ax.set_xlabel("iteration")
    axes[0, 0].legend(fontsize=8, loc="lower left")
    band_note = f"mean of {args.repeats} runs, band = min–max" if args.repeats > 1 else "one run"
    fig.suptitle(
        f"SGD vs SSD with locally optimal step sizes on {args.dim}-d stochastic quadratics (paper Fig. 2)\n"
        f"excess loss L(θ) − ν²tr(Q)/2, log scale; {band_note}; seed {args.seed}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    save_figure(fig, path)
