"""The paper's math, once: the family's switches, ρ, bias correction, γ and the update (docs/algorithm.md §1).

"Dissecting Adam" (Balles & Hennig, ICML 2018, Alg. 1 and 2) splits Adam into two orthogonal
aspects, the *sign* of the update direction and *variance adaptation*, on top of one moment
estimator. :class:`UpdateRule` holds the switches; every optimizer of the family is one
setting of them:

=========  ===========  =====  ===================
name       direction    sign   variance adaptation
=========  ===========  =====  ===================
M-SGD      momentum     no     no
M-SSD      momentum     yes    no
M-SVAG     momentum     no     yes
SVAG       gradient     no     yes
SSD        gradient     yes    no     (no moving average at all)
=========  ===========  =====  ===================

(Adam is momentum + sign + variance adaptation; the project uses ``torch.optim.Adam`` for it.)

One definition of the math
--------------------------
:func:`_update_math` is the only place where the update is written: the moment estimator,
the direction (m~, g or their sign), γ and the parameter update. It is written against a
small set of elementwise operations, ``ops`` (:class:`UpdateOps` says what each must do),
and every path runs *that* function: the single- and multi-tensor torch paths of
:mod:`lightning_msvag.functional` pass torch operations, the generated-kernel backends
(:mod:`lightning_msvag._cpu_kernel`) pass operations that emit source code and trace it
once per rule of :data:`RULES`.

The scalars (bias correction, ρ, the coefficients of γ, the step size) are computed in
Python, once per (step, group), by :func:`_coefficients`; every path uses them.

This module imports nothing of the project and no tensor library: the layers above it are
the backends, then the paths (:mod:`lightning_msvag.functional`), then the optimizers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Protocol

__all__ = [
    "UpdateRule",
    "UpdateOps",
    "RULES",
    "RHO_CAP",
    "bias_correction",
    "variance_ratio",
]

#: Cap on ρ from the authors' reference code: at k = 1, ρ = 1 and 1/(1−ρ) would be infinite.
RHO_CAP = 0.9999


@dataclass(frozen=True)
class UpdateRule:
    """One member of the family (paper Fig. 1), plus the choice of direction.

    Args:
        direction: ``"momentum"`` updates along the bias-corrected moving average m,
            ``"gradient"`` along the raw stochastic gradient g (SVAG, SSD).
        sign: update along the sign of the direction (sign descent; no magnitude):
            sign(m~) for M-SSD, sign(g) for SSD.
        variance_adaptation: scale each coordinate by the factor
            γ = m² / (m² + var), with var the estimated variance of the update direction
            (paper Lemma 1, docs/algorithm.md §1).
    """

    direction: str = "momentum"
    sign: bool = False
    variance_adaptation: bool = False

    def __post_init__(self) -> None:
        if self.direction not in ("momentum", "gradient"):
            raise ValueError(f"direction must be 'momentum' or 'gradient', got {self.direction!r}")
        if self.sign and self.variance_adaptation:
            raise ValueError(
                "sign + variance adaptation is Adam: use torch.optim.Adam "
                "(lightning_msvag.build_optimizer('adam', ...))"
            )

    @property
    def needs_first_moment(self) -> bool:
        """m~ is the direction (momentum) or feeds γ (variance adaptation)."""
        return self.direction == "momentum" or self.variance_adaptation

    @property
    def needs_second_moment(self) -> bool:
        return self.variance_adaptation


#: Every valid rule, in a fixed order (the C++ kernel is generated for each of them).
RULES = tuple(
    UpdateRule(direction, sign, va)
    for direction in ("momentum", "gradient")
    for sign in (False, True)
    for va in (False, True)
    if not (sign and va)
)


class _FloatScalars:
    """Scalar operations of the per-step coefficients on Python floats (the default).

    :func:`variance_ratio`, :func:`_gamma_coefficients` and :func:`_coefficients` use
    arithmetic operators, plus :meth:`minimum` and :meth:`where` where they need a
    choice, so that the same definitions can also be traced symbolically: the fused
    Triton kernel (:mod:`lightning_msvag._triton_kernel`) evaluates them per tensor on
    the device from its step counter. On floats these are ``min`` and ``a if c else b``.
    """

    symbolic = False
    minimum = staticmethod(min)

    @staticmethod
    def where(condition, a, b):
        return a if condition else b


_FLOATS = _FloatScalars()


def bias_correction(beta: float, step: int) -> float:
    """1 − β^k, the bias correction of a zero-initialised moving average (docs/algorithm.md §1)."""
    return 1.0 - beta**step


def variance_ratio(beta: float, step: int, ops=_FLOATS) -> float:
    """ρ(β, k) = (1−β)(1+β^k) / ((1+β)(1−β^k)), capped at :data:`RHO_CAP` (docs/algorithm.md §1).

    For i.i.d. gradients of variance σ², var[m] = ρ σ² and E[v − m²] = (1−ρ) σ².
    ``beta = 0`` gives ρ = 1 (capped) at every step. ``ops``: see :class:`_FloatScalars`.
    """
    if not ops.symbolic and step < 1:
        raise ValueError(f"step counter is 1-based, got {step}")
    beta_k = beta**step
    denominator = (1.0 + beta) * (1.0 - beta_k)
    positive = denominator > 0
    # the inner where keeps a symbolic (eagerly evaluated) division finite where the outer discards it
    rho = ops.where(positive, (1.0 - beta) * (1.0 + beta_k) / ops.where(positive, denominator, 1.0), 1.0)
    return ops.minimum(rho, RHO_CAP)


class Coefficients(NamedTuple):
    """The scalars of one step (same for every element of every tensor of a bucket).

    ``va``: this step applies γ (variance adaptation at k ≥ 2; at k = 1, s = 0 exactly so
    γ = 1, docs/algorithm.md §1, and the step is a plain SGD step). In the generated C++
    the numeric fields are the names of the kernel's scalar arguments instead of numbers.
    """

    grad_sign: object  # the gradient multiplier: +1, −1 for maximize, divided by an AMP grad scale
    one_minus_beta: object
    beta: object
    kappa: object
    upper: object
    neg_scale: object
    va: bool


def _gamma_coefficients(rule: UpdateRule, beta: float, step: int, ops=_FLOATS):
    """Scalars that turn raw buffers into γ without materialising m, v or s.

    With bc = 1 − β^k, m = m~/bc and v = v~/bc. M-SVAG's γ = m²/(m² + ρ s) with
    s = (v − m²)/(1 − ρ), SVAG's γ = m²/(m² + s) (docs/algorithm.md §1). Both read
    γ = m² / ((1 − r) m² + r v) with r = ρ/(1−ρ) (M-SVAG) or r = 1/(1−ρ) (SVAG), i.e.

        γ = λ · m~² / (v~ + κ m~²),   λ = 1/(r bc),   κ = (1 − r)/(r bc).

    Returns (κ, upper = 1/λ): the paths compute γ' = m~²/(v~ + κ m~²) clipped to
    [0, upper], which is γ/λ clipped to γ ∈ [0, 1].
    """
    rho = variance_ratio(beta, step, ops)
    bc = bias_correction(beta, step)
    r = rho / (1.0 - rho) if rule.direction == "momentum" else 1.0 / (1.0 - rho)
    kappa = (1.0 - r) / (r * bc)
    upper = r * bc
    return kappa, upper


def _coefficients(
    rule: UpdateRule, lr: float, beta: float, step: int, maximize: bool, ops=_FLOATS, va: Optional[bool] = None
) -> Coefficients:
    """All scalars of step ``step`` (1-based), for every path.

    ``va=None`` decides from ``step``; a symbolic ``step`` (``ops``, see
    :class:`_FloatScalars`) needs it given: the Triton kernel traces both branches and
    selects per tensor on k > 1.
    """
    if va is None:
        va = step > 1  # at k = 1, γ = 1 exactly (docs/algorithm.md §1)
    va = rule.variance_adaptation and va
    kappa, upper = _gamma_coefficients(rule, beta, step, ops) if va else (0.0, 1.0)
    if rule.sign:
        scale = lr  # θ ← θ − α sign(·): the sign needs no bias correction
    elif rule.direction == "momentum":
        scale = lr / bias_correction(beta, step)  # m = m~ / bc
    else:
        scale = lr
    if va:
        scale /= upper  # γ = γ' / upper
    return Coefficients(-1.0 if maximize else 1.0, 1.0 - beta, beta, kappa, upper, -scale, va)


# --------------------------------------------------------------------------------------
# What a backend provides
# --------------------------------------------------------------------------------------

#: a tensor, a list of tensors, or a C++ expression: whatever the backend computes with
Value = Any


class UpdateOps(Protocol):
    """The elementwise operations :func:`_update_math` is written against (one backend each).

    Naming rule: an operation whose name ends in ``_`` may update its *first* argument in
    place and returns it (the torch backends do; the C++ generator, which has nothing to
    update, returns a new expression instead); the other operations leave their arguments
    unchanged and return a new value. Either way callers use only the returned values, so
    one :func:`_update_math` serves both. Scalars (``s``, ``w``, ``beta``, ``k``, ``lo``,
    ``hi``) are numbers, or, for a code generator, the names of the kernel's arguments.
    """

    #: smallest normal number of the compute dtype (keeps γ's 0/0 at 0, see :func:`_gamma_math`)
    tiny: Any

    def scale_grad(self, g: Value, s: Any) -> Value:
        """s·g with s = ±1 (maximize) / grad scale (AMP); new value, or ``g`` itself when s = +1 (g is only read)."""

    def lerp_(self, m: Value, g: Value, w: Any) -> Value:
        """m ← m + w (g − m), in place on ``m``."""

    def ema_square_(self, v: Value, g: Value, beta: Any, w: Any) -> Value:
        """v ← β v + w g², in place on ``v``."""

    def sign(self, x: Value) -> Value:
        """sign(x), sign(0) = 0; new value."""

    def mul(self, a: Value, b: Value) -> Value:
        """a·b; new value."""

    def add_scaled(self, a: Value, b: Value, k: Any) -> Value:
        """a + k b; new value."""

    def add_scalar_(self, a: Value, s: Any) -> Value:
        """a ← a + s, in place on ``a``."""

    def div_(self, a: Value, b: Value) -> Value:
        """a ← a / b, in place on ``a``."""

    def clamp_(self, x: Value, lo: float, hi: Any) -> Value:
        """x ← min(max(x, lo), hi), in place on ``x``."""

    def addcmul_(self, p: Value, a: Value, b: Value, s: Any) -> Value:
        """p ← p + s a b, in place on ``p``."""

    def add_(self, p: Value, d: Value, s: Any) -> Value:
        """p ← p + s d, in place on ``p``."""


# --------------------------------------------------------------------------------------
# The one definition of the update
# --------------------------------------------------------------------------------------


def _gamma_math(ops: UpdateOps, m: Value, v: Value, kappa: Any, upper: Any) -> Value:
    """γ' = clip(m~² / (v~ + κ m~² + tiny), 0, upper) (see :func:`_gamma_coefficients`).

    ``tiny`` is the smallest normal number of the compute dtype: where m = v = 0 the
    quotient 0/0 would be NaN, and docs/algorithm.md §1 wants γ = 0 there (no update); any
    denominator above ~1e-31 (float32) is unchanged by it. The lower clip at 0 applies to
    every dtype: v~·bc ≥ m~² holds exactly but round-off can undercut it.
    """
    a = ops.mul(m, m)
    denominator = ops.add_scaled(v, a, kappa)
    denominator = ops.add_scalar_(denominator, ops.tiny)
    return ops.clamp_(ops.div_(a, denominator), 0.0, upper)


def _update_math(rule: UpdateRule, ops: UpdateOps, c: Coefficients, p: Value, g: Value, m: Value, v: Value):
    """One step of ``rule`` on (θ, g, m~, v~): returns the new (θ, m~, v~).

    The only definition of the update (docs/algorithm.md §1); every path runs it.
    ``ops`` may update its arguments in place (torch paths) or return new values
    (the C++ generator); callers use the returned values (see :class:`UpdateOps`).
    """
    g = ops.scale_grad(g, c.grad_sign)  # maximize: ascend = descend on −g; AMP: unscale
    if rule.needs_first_moment:
        m = ops.lerp_(m, g, c.one_minus_beta)  # m~ ← β m~ + (1−β) g
    if rule.needs_second_moment:
        v = ops.ema_square_(v, g, c.beta, c.one_minus_beta)  # v~ ← β v~ + (1−β) g²
    direction = m if rule.direction == "momentum" else g
    if rule.sign:
        direction = ops.sign(direction)  # sign(0) = 0: no move
    if c.va:
        gamma = _gamma_math(ops, m, v, c.kappa, c.upper)
        p = ops.addcmul_(p, gamma, direction, c.neg_scale)  # θ ← θ − α γ d
    else:
        p = ops.add_(p, direction, c.neg_scale)  # θ ← θ − α d
    return p, m, v

