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
M-SSD-VA   momentum     yes    yes    (the paper's estimator; ``sign_factor`` erf or sqrt)
=========  ===========  =====  ===================

(Adam is momentum + sign + variance adaptation with its own estimator (β2, ε); the project
uses ``torch.optim.Adam`` for it. M-SSD-VA is the same corner with the paper's estimator,
docs/algorithm.md §1.2.) ``variance="minibatch"`` swaps the moving-average variance estimate
of a variance-adapted rule for the mini-batch one (docs/algorithm.md §1.1).

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
            (paper Lemma 1, docs/algorithm.md §1). With ``sign``, the factor of a sign
            update instead (see ``sign_factor``).
        sign_factor: only for ``sign`` + ``variance_adaptation`` (docs/algorithm.md §1.2):
            the factor γ^s applied to the sign, from the relative variance η² = var/m² of the
            direction (1 + η² = 1/γ, γ the non-sign rule's factor): ``"erf"`` the optimal
            erf[(√2 η)⁻¹] = erf(√(γ / (2(1−γ)))) (paper §3.1), ``"sqrt"`` Adam's implicit
            (1 + η²)^−½ = √γ (paper Fig. 3).
        variance: where var comes from, for ``variance_adaptation``: ``"moving_average"``
            (the paper's estimate from m~ and v~, docs/algorithm.md §1) or ``"minibatch"``
            (the mini-batch estimate σ̂² of each step, an extra operand; docs/algorithm.md §1.1).
    """

    direction: str = "momentum"
    sign: bool = False
    variance_adaptation: bool = False
    sign_factor: str = "erf"
    variance: str = "moving_average"

    def __post_init__(self) -> None:
        if self.direction not in ("momentum", "gradient"):
            raise ValueError(f"direction must be 'momentum' or 'gradient', got {self.direction!r}")
        if self.sign_factor not in ("erf", "sqrt"):
            raise ValueError(f"sign_factor must be 'erf' or 'sqrt', got {self.sign_factor!r}")
        if self.sign_factor != "erf" and not (self.sign and self.variance_adaptation):
            # one spelling per rule: RULES and the kernel's dispatch are keyed by the rule
            raise ValueError("sign_factor applies to sign + variance adaptation only")
        if self.variance not in ("moving_average", "minibatch"):
            raise ValueError(f"variance must be 'moving_average' or 'minibatch', got {self.variance!r}")
        if self.variance == "minibatch" and not self.variance_adaptation:
            raise ValueError("variance='minibatch' applies to variance adaptation only")

    @property
    def label(self) -> str:
        """The method's name in the paper's spelling (Fig. 1): M-SGD, M-SSD, M-SVAG, SVAG, SSD, M-SSD-VA, ..."""
        prefix = "M-" if self.direction == "momentum" else ""
        if self.sign:
            return prefix + ("SSD-VA" if self.variance_adaptation else "SSD")
        return prefix + ("SVAG" if self.variance_adaptation else "SGD")

    @property
    def needs_first_moment(self) -> bool:
        """m~ is the direction (momentum) or feeds γ (variance adaptation)."""
        return self.direction == "momentum" or self.variance_adaptation

    @property
    def needs_second_moment(self) -> bool:
        return self.variance_adaptation

    @property
    def needs_batch_variance(self) -> bool:
        """Each step needs the mini-batch variance estimate σ̂² as an extra operand (docs/algorithm.md §1.1)."""
        return self.variance == "minibatch"


#: Every rule on the four operands (θ, g, m~, v~), in a fixed order (the generated kernels are
#: built for each of them). Rules with ``variance="minibatch"`` (a fifth operand) are in
#: :data:`MINIBATCH_RULES` (docs/algorithm.md §1.1).
RULES = tuple(
    UpdateRule(direction, sign, va)
    for direction in ("momentum", "gradient")
    for sign in (False, True)
    for va in (False, True)
    if not (sign and va)
) + tuple(  # sign + variance adaptation (docs/algorithm.md §1.2); appended, so earlier indices keep
    UpdateRule(direction, True, True, sign_factor)
    for direction in ("momentum", "gradient")
    for sign_factor in ("erf", "sqrt")
)

#: The ``variance="minibatch"`` rules (docs/algorithm.md §1.1): one extra operand σ̂². The fused
#: CPU kernel is generated for them too (``_cpu_kernel.KERNEL_RULES``); a backend without the
#: extra operand leaves them to the multi-tensor path.
MINIBATCH_RULES = tuple(
    UpdateRule(direction, sign, True, "erf", "minibatch")
    for direction in ("momentum", "gradient")
    for sign in (False, True)
) + tuple(UpdateRule(direction, True, True, "sqrt", "minibatch") for direction in ("momentum", "gradient"))


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
    ``var_decay`` / ``var_weight``: only for ``variance="minibatch"`` rules, the second
    buffer's update v~ ← var_decay · v~ + var_weight · σ̂² (docs/algorithm.md §1.1).
    """

    grad_sign: object  # the gradient multiplier: +1, −1 for maximize, divided by an AMP grad scale
    one_minus_beta: object
    beta: object
    kappa: object
    upper: object
    neg_scale: object
    va: bool
    var_decay: object = 0.0
    var_weight: object = 0.0


def _gamma_coefficients(rule: UpdateRule, beta: float, step: int, ops=_FLOATS):
    """Scalars that turn raw buffers into γ without materialising m, v or s.

    With bc = 1 − β^k, m = m~/bc and v = v~/bc. M-SVAG's γ = m²/(m² + ρ s) with
    s = (v − m²)/(1 − ρ), SVAG's γ = m²/(m² + s) (docs/algorithm.md §1). Both read
    γ = m² / ((1 − r) m² + r v) with r = ρ/(1−ρ) (M-SVAG) or r = 1/(1−ρ) (SVAG), i.e.

        γ = λ · m~² / (v~ + κ m~²),   λ = 1/(r bc),   κ = (1 − r)/(r bc).

    Returns (κ, upper = 1/λ): the paths compute γ' = m~²/(v~ + κ m~²) clipped to
    [0, upper], which is γ/λ clipped to γ ∈ [0, 1].
    """
    if rule.needs_batch_variance:
        return _minibatch_gamma_coefficients(rule, beta, step)
    rho = variance_ratio(beta, step, ops)
    bc = bias_correction(beta, step)
    r = rho / (1.0 - rho) if rule.direction == "momentum" else 1.0 / (1.0 - rho)
    kappa = (1.0 - r) / (r * bc)
    upper = r * bc
    return kappa, upper


def _minibatch_gamma_coefficients(rule: UpdateRule, beta: float, step: int):
    """(κ, upper) of :func:`_gamma_coefficients` for ``variance="minibatch"`` (docs/algorithm.md §1.1).

    Momentum: v~ holds u_k = β² u_{k−1} + (1−β)² σ̂²_k and var̂[m] = u/bc², so
    γ = m²/(m² + var̂[m]) = m~²/(m~² + u): κ = 1, upper = 1. Gradient (SVAG): v~ holds σ̂²_k
    of this step and γ = m²/(m² + σ̂²) = (1/bc²) m~²/(σ̂² + m~²/bc²): κ = 1/bc², upper = bc².
    """
    if rule.direction == "momentum":
        return 1.0, 1.0
    bc = bias_correction(beta, step)
    return 1.0 / (bc * bc), bc * bc


def _coefficients(
    rule: UpdateRule, lr: float, beta: float, step: int, maximize: bool, ops=_FLOATS, va: Optional[bool] = None
) -> Coefficients:
    """All scalars of step ``step`` (1-based), for every path.

    ``va=None`` decides from ``step``; a symbolic ``step`` (``ops``, see
    :class:`_FloatScalars`) needs it given: the Triton kernel traces both branches and
    selects per tensor on k > 1.
    """
    if va is None:
        # at k = 1 the moving-average s = 0 exactly, so γ = 1 (docs/algorithm.md §1); the
        # mini-batch estimate is a real one from the first batch on (docs/algorithm.md §1.1)
        va = rule.needs_batch_variance or step > 1
    va = rule.variance_adaptation and va
    kappa, upper = _gamma_coefficients(rule, beta, step, ops) if va else (0.0, 1.0)
    if rule.sign:
        scale = lr  # θ ← θ − α sign(·): the sign needs no bias correction
    elif rule.direction == "momentum":
        scale = lr / bias_correction(beta, step)  # m = m~ / bc
    else:
        scale = lr
    if va and not rule.sign:
        scale /= upper  # γ = γ' / upper
    elif va and rule.sign_factor == "sqrt":
        scale /= upper**0.5  # √γ = √γ' / √upper (the erf factor takes γ'/upper inside, _sign_factor_math)
    decay, weight = 0.0, 0.0
    if rule.needs_batch_variance:
        # momentum: u ← β² u + (1−β)² σ̂² (var[m~] = Σ_s ((1−β)β^{k−s})² σ²_s); gradient: v~ ← σ̂²
        decay, weight = (beta * beta, (1.0 - beta) ** 2) if rule.direction == "momentum" else (0.0, 1.0)
    return Coefficients(-1.0 if maximize else 1.0, 1.0 - beta, beta, kappa, upper, -scale, va, decay, weight)


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

    # -- used by sign + variance adaptation (docs/algorithm.md §1.2) --

    def rsub_scalar(self, x: Value, s: Any) -> Value:
        """s − x; new value."""

    def sqrt_(self, x: Value) -> Value:
        """x ← √x, in place on ``x`` (x ≥ 0; √∞ = ∞)."""

    def erf_(self, x: Value) -> Value:
        """x ← erf(x), in place on ``x`` (erf(∞) = 1)."""

    # -- used by variance="minibatch" rules (docs/algorithm.md §1.1; MINIBATCH_RULES) --

    def ema_(self, v: Value, x: Value, decay: Any, w: Any) -> Value:
        """v ← decay · v + w x, in place on ``v``."""


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


def _sign_factor_math(ops: UpdateOps, gamma: Value, upper: Any, sign_factor: str) -> Value:
    """γ^s of a sign update from γ' = γ · upper (:func:`_gamma_math`), docs/algorithm.md §1.2.

    With η² the relative variance of the direction, 1 + η² = 1/γ. ``"sqrt"``: Adam's
    (1 + η²)^−½ = √γ; this returns √γ' and :func:`_coefficients` divides the step by
    √upper. ``"erf"``: erf[(√2 η)⁻¹] = erf(√(γ/(2(1−γ)))) = erf(√(γ'/(2(upper − γ')))).
    γ' is clipped to [0, upper], so the quotient lies in [0, ∞]: γ = 1 (no variance) gives
    x/0 = ∞ and erf(∞) = 1, γ = 0 (also where m = v = 0) gives 0; never NaN.
    """
    if sign_factor == "sqrt":
        return ops.sqrt_(gamma)
    denominator = ops.rsub_scalar(gamma, upper)  # upper − γ' ≥ 0
    denominator = ops.add_scaled(denominator, denominator, 1.0)  # 2(upper − γ')
    return ops.erf_(ops.sqrt_(ops.div_(gamma, denominator)))


def _update_math(rule: UpdateRule, ops: UpdateOps, c: Coefficients, p: Value, g: Value, m: Value, v: Value,
                 s: Value = None):
    """One step of ``rule`` on (θ, g, m~, v~): returns the new (θ, m~, v~).

    The only definition of the update (docs/algorithm.md §1); every path runs it.
    ``ops`` may update its arguments in place (torch paths) or return new values
    (the C++ generator); callers use the returned values (see :class:`UpdateOps`).
    ``s``: the mini-batch variance estimate σ̂² of this step, for ``variance="minibatch"``
    rules only (docs/algorithm.md §1.1); it is only read.
    """
    g = ops.scale_grad(g, c.grad_sign)  # maximize: ascend = descend on −g; AMP: unscale
    if rule.needs_first_moment:
        m = ops.lerp_(m, g, c.one_minus_beta)  # m~ ← β m~ + (1−β) g
    if rule.needs_batch_variance:
        # var[−g] = var[g]: maximize leaves σ̂² as it is
        v = ops.ema_(v, s, c.var_decay, c.var_weight)  # u ← β² u + (1−β)² σ̂² (SVAG: v~ ← σ̂²)
    elif rule.needs_second_moment:
        v = ops.ema_square_(v, g, c.beta, c.one_minus_beta)  # v~ ← β v~ + (1−β) g²
    direction = m if rule.direction == "momentum" else g
    if rule.sign:
        direction = ops.sign(direction)  # sign(0) = 0: no move
    if c.va:
        gamma = _gamma_math(ops, m, v, c.kappa, c.upper)
        if rule.sign:
            gamma = _sign_factor_math(ops, gamma, c.upper, rule.sign_factor)  # γ^s (docs/algorithm.md §1.2)
        p = ops.addcmul_(p, gamma, direction, c.neg_scale)  # θ ← θ − α γ d
    else:
        p = ops.add_(p, direction, c.neg_scale)  # θ ← θ − α d
    return p, m, v

