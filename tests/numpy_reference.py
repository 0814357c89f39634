"""An independent NumPy transcription of docs/algorithm.md §1, written from the formulas, not the code.

Every quantity is computed literally as docs/algorithm.md §1 states it (m, v, ρ with its cap, s, γ with the
clip and the NaN rule), in float64, one parameter tensor at a time.
"""

from __future__ import annotations

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
    """State and update of M-SGD / M-SSD / M-SVAG / SVAG for one parameter array."""

    def __init__(self, method: str, theta: np.ndarray, lr: float, beta: float):
        assert method in ("m-sgd", "m-ssd", "m-svag", "svag")
        self.method, self.lr, self.beta = method, lr, beta
        self.theta = np.array(theta, dtype=np.float64)
        self.m_tilde = np.zeros_like(self.theta)
        self.v_tilde = np.zeros_like(self.theta)
        self.k = 0
        self.gamma = None

    def step(self, g: np.ndarray, maximize: bool = False) -> None:
        g = np.asarray(g, dtype=np.float64)
        if maximize:
            g = -g
        b, lr = self.beta, self.lr
        self.k += 1
        k = self.k
        self.m_tilde = b * self.m_tilde + (1 - b) * g
        self.v_tilde = b * self.v_tilde + (1 - b) * g**2
        m = self.m_tilde / (1 - b**k)
        v = self.v_tilde / (1 - b**k)
        r = rho(b, k)
        s = (v - m**2) / (1 - r)
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.method == "m-svag":
                gamma = m**2 / (m**2 + r * s)
            elif self.method == "svag":
                gamma = m**2 / (m**2 + s)
            else:
                gamma = None
        if gamma is not None:
            gamma = np.clip(gamma, 0.0, 1.0)
            gamma[np.isnan(gamma)] = 0.0
            self.gamma = gamma
        if self.method == "m-sgd":
            self.theta = self.theta - lr * m
        elif self.method == "m-ssd":
            self.theta = self.theta - lr * np.sign(self.m_tilde)
        elif self.method == "m-svag":
            self.theta = self.theta - lr * gamma * m
        else:
            self.theta = self.theta - lr * gamma * g
