"""An independent NumPy transcription of docs/algorithm.md §1, written from the formulas, not the code.

Every quantity is computed literally as docs/algorithm.md §1 states it (m, v, ρ with its cap, s, γ with the
clip and the NaN rule), in float64, one parameter tensor at a time.
"""

from __future__ import annotations

import math

import numpy as np

RHO_CAP = 0.9999


def rho(beta: float, k: int) -> float:
    """ρ(β,k) = (1−β)(1+β^k) / ((1+β)(1−β^k)), then ρ ← min(ρ, 0.9999)."""
    value = (1 - beta) * (1 + beta**k) / ((1 + beta) * (1 - beta**k))
    return min(value, RHO_CAP)


def rho_reference_form(beta: float, k: int) -> float:
    """The reference code's form (1−β)² (1−β^{2k}) / ((1−β^k)² (1−β²)), capped."""
    value = (1 - beta) ** 2 * (1 - beta ** (2 * k)) / ((1 - beta**k) ** 2 * (1 - beta**2))
    return min(value, RHO_CAP)


class NumpyFamily:
    """State and update of one member of the family for one parameter array.

    ``rule`` gives the paper's switches (docs/algorithm.md §1, paper Fig. 1): ``direction``
    ("momentum": the bias-corrected moving average m, "gradient": the raw g), ``sign``
    (update along the sign: sign(m~) resp. sign(g)) and ``variance_adaptation`` (γ ⊙ the
    direction, γ = m²/(m² + ρ s) for m, m²/(m² + s) for g). The tables of the docs:
    M-SGD = (momentum, -, -), M-SSD = (momentum, sign, -), M-SVAG = (momentum, -, VA),
    SVAG = (gradient, -, VA), SSD = (gradient, sign, -). m~ and v~ are always tracked here,
    used or not.

    Beyond the paper's main text (docs/algorithm.md §1.1, §1.2), read from the rule's
    ``variance`` and ``sign_factor`` when it has them:

    * ``variance="minibatch"``: ``step`` takes the mini-batch estimate σ̂² of var[g]; for m,
      u ← β² u + (1−β)² σ̂², var̂[m] = u/(1−β^k)², γ = m²/(m² + var̂[m]); for g,
      γ = m²/(m² + σ̂²). ``self.u`` is what the optimizer keeps (u, or σ̂² for g).
    * sign + variance adaptation: η² = var/m² with var the variance estimate of the
      direction (ρ s for m, s for g, or the mini-batch ones), θ ← θ − α f(η) sign(m~) with
      f = erf(1/(√2 η)) (``"erf"``) or (1 + η²)^(−1/2) (``"sqrt"``); 0 where m = 0 and var = 0.
    """

    def __init__(self, rule, theta: np.ndarray, lr: float, beta: float):
        assert rule.direction in ("momentum", "gradient")
        self.rule, self.lr, self.beta = rule, lr, beta
        self.theta = np.array(theta, dtype=np.float64)
        self.m_tilde = np.zeros_like(self.theta)
        self.v_tilde = np.zeros_like(self.theta)
        self.u = np.zeros_like(self.theta)
        self.k = 0
        self.gamma = None
        self.sign_gamma = None

    def step(self, g: np.ndarray, maximize: bool = False, batch_variance=None) -> None:
        g = np.asarray(g, dtype=np.float64)
        if maximize:
            g = -g
        b, lr, rule = self.beta, self.lr, self.rule
        self.k += 1
        k = self.k
        self.m_tilde = b * self.m_tilde + (1 - b) * g
        self.v_tilde = b * self.v_tilde + (1 - b) * g**2
        m = self.m_tilde / (1 - b**k)
        v = self.v_tilde / (1 - b**k)
        r = rho(b, k)
        s = (v - m**2) / (1 - r)
        momentum = rule.direction == "momentum"
        minibatch = getattr(rule, "variance", "moving_average") == "minibatch"
        if rule.variance_adaptation and (rule.sign or minibatch):
            self._extended_step(g, m, r * s if momentum else s, batch_variance, minibatch, momentum)
            return
        if rule.sign:
            self.theta = self.theta - lr * np.sign(self.m_tilde if momentum else g)
            return
        direction = m if momentum else g
        if rule.variance_adaptation:
            with np.errstate(divide="ignore", invalid="ignore"):
                gamma = m**2 / (m**2 + (r * s if momentum else s))
            gamma = np.clip(gamma, 0.0, 1.0)
            gamma[np.isnan(gamma)] = 0.0
            self.gamma = gamma
            direction = gamma * direction
        self.theta = self.theta - lr * direction


def step_from_state(rule, theta, m_tilde, v_tilde, k, g, lr, beta, maximize=False):
    """One step (the (k+1)-th) from a given state, in float64: returns (θ, m~, v~).

    For 16-bit parameters the optimizers define a step as: this float64 update computed
    from the 16-bit values of θ, g, m~, v~, then each result rounded to nearest (even) in
    the 16-bit dtype. (The code computes in float32, which can change the rounded result
    by one unit in the last place where the exact value lies within float32 round-off of a
    rounding boundary.)
    """
    family = NumpyFamily(rule, theta, lr, beta)
    family.m_tilde = np.array(m_tilde, dtype=np.float64)
    family.v_tilde = np.array(v_tilde, dtype=np.float64)
    family.k = k
    family.step(g, maximize=maximize)
    return family.theta, family.m_tilde, family.v_tilde


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _extended_step(self, g, m, var_moving_average, batch_variance, minibatch, momentum):
    """The mini-batch variance (docs/algorithm.md §1.1) and sign + variance adaptation (§1.2)."""
    b, lr, k, rule = self.beta, self.lr, self.k, self.rule
    if minibatch:
        sigma2 = np.asarray(batch_variance, dtype=np.float64)
        if momentum:
            self.u = b**2 * self.u + (1 - b) ** 2 * sigma2
            var = self.u / (1 - b**k) ** 2  # var̂[m]
        else:
            self.u = sigma2.copy()
            var = sigma2  # var̂[g] of this step
    else:
        var = var_moving_average
    with np.errstate(divide="ignore", invalid="ignore"):
        gamma = m**2 / (m**2 + var)
    gamma = np.clip(gamma, 0.0, 1.0)
    gamma[np.isnan(gamma)] = 0.0
    self.gamma = gamma
    direction = m if momentum else g
    if not rule.sign:
        self.theta = self.theta - lr * gamma * direction
        return
    var = np.maximum(var, 0.0)  # the moving-average s can be −0 by round-off
    with np.errstate(divide="ignore", invalid="ignore"):
        eta2 = var / m**2  # m = 0, var > 0: +inf; m = var = 0: nan
        if rule.sign_factor == "erf":
            factor = _erf(1.0 / (np.sqrt(2.0) * np.sqrt(eta2)))  # η = 0: erf(+inf) = 1
        else:
            factor = 1.0 / np.sqrt(1.0 + eta2)
    factor[np.isnan(factor)] = 0.0
    self.sign_gamma = factor
    self.theta = self.theta - lr * factor * np.sign(self.m_tilde if momentum else g)


NumpyFamily._extended_step = _extended_step
