"""Functional core of the "Dissecting Adam" optimizer family (docs/algorithm.md §1, paper Alg. 1 and 2).

The paper splits Adam into two orthogonal aspects, the *sign* of the update direction and
*variance adaptation*, on top of one moment estimator. :class:`UpdateRule` holds the
switches; every optimizer of the family is one setting of them:

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
small set of elementwise operations (``ops``), and every path runs *that* function:

* single-tensor path (``foreach=False``): ``ops`` are in-place torch ops on one tensor (or
  one CPU tile of it). With ``tile_numel=None`` this is the plain, untiled reference path.
* multi-tensor path (``foreach=True``): ``ops`` are ``torch._foreach_*`` ops over lists;
  the default on CUDA.
* fused CPU kernel (``fused=True``, the default on CPU): ``ops`` emit C++ expressions;
  :mod:`lightning_msvag._cpu_kernel` traces :func:`_update_math` once per rule of
  :data:`RULES` into a multi-tensor C++ kernel (one call per param group: ``at::parallel_for``
  over the concatenated index space of all its tensors, each element read once and written
  once; the same traffic as torch's fused Adam: read g, θ, m~, v~, write θ, m~, v~, and no
  temporaries). The kernel is compiled once per machine and version (about 1-3 s with the
  system C++ compiler), cached on disk under ``$LIGHTNING_MSVAG_CACHE`` or
  ``~/.cache/lightning_msvag`` behind a file lock (safe when several DDP ranks start at
  once), announced in one line when it is built. Where no compiler exists (or the build
  fails) one warning is raised and the multi-tensor path is used.

The scalars (bias correction, ρ, the coefficients of γ, the step size) are computed in
Python, once per (step, group), by :func:`_coefficients`; every path uses them.

16-bit parameters (float16, bfloat16): every path computes the step in float32 from the
16-bit values of θ, g, m~, v~ and rounds θ, m~, v~ to the parameter dtype once at the end
(round to nearest even). float64 computes in float64, float32 in float32.

On CPU the single- and multi-tensor paths work on *tiles*: flat slices of at most
:data:`CPU_TILE_NUMEL` elements, so that their many memory passes hit cache.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Iterator, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "UpdateRule",
    "RULES",
    "RHO_CAP",
    "CPU_TILE_NUMEL",
    "bias_correction",
    "variance_ratio",
    "variance_adaptation_factor",
    "dissected_adam",
    "fused_path_available",
]

#: Cap on ρ from the authors' reference code: at k = 1, ρ = 1 and 1/(1−ρ) would be infinite.
RHO_CAP = 0.9999

#: Elements per tile on CPU (single- and multi-tensor paths). 2**20 float32 values are
#: 4 MiB per buffer: the live buffers of an M-SVAG tile stay in a 32 MiB L3 cache.
CPU_TILE_NUMEL = 2**20

_LOW_PRECISION = (torch.float16, torch.bfloat16)


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

    grad_sign: object  # +1, or −1 for maximize
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
# The one definition of the update
# --------------------------------------------------------------------------------------


def _gamma_math(ops, m, v, kappa, upper):
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


def _update_math(rule: UpdateRule, ops, c: Coefficients, p, g, m, v):
    """One step of ``rule`` on (θ, g, m~, v~): returns the new (θ, m~, v~).

    The only definition of the update (docs/algorithm.md §1); every path runs it.
    ``ops`` may update its arguments in place (torch paths) or return new values
    (the C++ generator); callers use the returned values.
    """
    g = ops.scale_grad(g, c.grad_sign)  # maximize: ascend = descend on −g
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


class _TensorOps:
    """``ops`` for :func:`_update_math` on single tensors (in place where possible)."""

    def __init__(self, dtype: torch.dtype):
        self.tiny = torch.finfo(dtype).tiny

    scale_grad = staticmethod(lambda g, s: g if s == 1.0 else torch.neg(g))
    lerp_ = staticmethod(lambda m, g, w: m.lerp_(g, w))
    ema_square_ = staticmethod(lambda v, g, beta, w: v.mul_(beta).addcmul_(g, g, value=w))
    sign = staticmethod(torch.sign)
    mul = staticmethod(torch.mul)
    add_scaled = staticmethod(lambda a, b, k: torch.add(a, b, alpha=k))
    add_scalar_ = staticmethod(lambda a, s: a.add_(s))
    div_ = staticmethod(lambda a, b: a.div_(b))
    clamp_ = staticmethod(lambda x, lo, hi: x.clamp_(lo, hi))
    addcmul_ = staticmethod(lambda p, a, b, s: p.addcmul_(a, b, value=s))
    add_ = staticmethod(lambda p, d, s: p.add_(d, alpha=s))


class _ForeachOps:
    """``ops`` for :func:`_update_math` on lists of tensors (``torch._foreach_*``)."""

    def __init__(self, dtype: torch.dtype):
        self.tiny = torch.finfo(dtype).tiny

    scale_grad = staticmethod(lambda g, s: g if s == 1.0 else torch._foreach_neg(g))
    sign = staticmethod(torch._foreach_sign)
    mul = staticmethod(torch._foreach_mul)
    add_scaled = staticmethod(lambda a, b, k: torch._foreach_add(a, b, alpha=k))
    div_ = staticmethod(lambda a, b: torch._foreach_div_(a, b) or a)
    add_scalar_ = staticmethod(lambda a, s: torch._foreach_add_(a, s) or a)
    lerp_ = staticmethod(lambda m, g, w: torch._foreach_lerp_(m, g, w) or m)
    addcmul_ = staticmethod(lambda p, a, b, s: torch._foreach_addcmul_(p, a, b, value=s) or p)
    add_ = staticmethod(lambda p, d, s: torch._foreach_add_(p, d, alpha=s) or p)

    @staticmethod
    def ema_square_(v, g, beta, w):
        torch._foreach_mul_(v, beta)
        torch._foreach_addcmul_(v, g, g, value=w)
        return v

    @staticmethod
    def clamp_(x, lo, hi):
        torch._foreach_clamp_min_(x, lo)
        torch._foreach_clamp_max_(x, hi)
        return x


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def variance_adaptation_factor(
    exp_avg: Tensor, exp_avg_sq: Tensor, *, beta: float, step: int, direction: str = "momentum"
) -> Tensor:
    """γ of the step ``step`` from the raw moving averages m~ and v~ (docs/algorithm.md §1).

    ``direction="momentum"`` gives M-SVAG's γ = m²/(m² + ρ s), ``"gradient"`` SVAG's
    γ = m²/(m² + s). γ ∈ [0, 1], and γ = 0 where m = v = 0. At k = 1, s = 0 exactly, so
    γ = 1 wherever m ≠ 0. Returned in float32 for 16-bit inputs, else in their dtype.
    """
    compute = _compute_dtype(exp_avg.dtype)
    if step == 1:
        return (exp_avg != 0).to(compute)
    rule = UpdateRule(direction=direction, variance_adaptation=True)
    kappa, upper = _gamma_coefficients(rule, beta, step)
    m, v = exp_avg.to(compute), exp_avg_sq.to(compute)
    return _gamma_math(_TensorOps(compute), m, v, kappa, upper).div_(upper)


# --------------------------------------------------------------------------------------
# Single- and multi-tensor paths
# --------------------------------------------------------------------------------------


def _can_tile(tensors: Sequence[Optional[Tensor]], tile_numel: Optional[int]) -> bool:
    """Tiles pay off on CPU only (cache reuse); they need flat views of every buffer."""
    return tile_numel is not None and all(
        t is None or (t.device.type == "cpu" and t.is_contiguous()) for t in tensors
    )


def _flat_chunks(tensors: Sequence[Optional[Tensor]], tile_numel: int) -> Iterator[tuple]:
    """Aligned flat slices of at most ``tile_numel`` elements of same-shaped tensors."""
    numel = tensors[0].numel()
    flats = [None if t is None else t.view(-1) for t in tensors]
    for start in range(0, numel, tile_numel):
        yield tuple(None if f is None else f[start : start + tile_numel] for f in flats)


def _upcast(tensors):
    """16-bit buffers → float32 working copies (the gradient is only read)."""
    return [None if t is None else t.float() for t in tensors]


def _single_tensor_update(params, grads, exp_avgs, exp_avg_sqs, steps, *, rule, lr, beta, maximize, tile_numel):
    for param, grad, exp_avg, exp_avg_sq, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        tensors = (param, grad, exp_avg, exp_avg_sq)
        chunks = _flat_chunks(tensors, tile_numel) if _can_tile(tensors, tile_numel) else [tensors]
        c = _coefficients(rule, lr, beta, step, maximize)
        low_precision = param.dtype in _LOW_PRECISION
        ops = _TensorOps(_compute_dtype(param.dtype))
        for p, g, m, v in chunks:
            if low_precision:
                work = _upcast((p, g, m, v))
                new = _update_math(rule, ops, c, *work)
                for dst, src in zip((p, m, v), new):
                    if dst is not None:
                        dst.copy_(src)  # one rounding to the 16-bit dtype
            else:
                _update_math(rule, ops, c, p, g, m, v)


def _tile_groups(tensor_lists: Sequence[Sequence[Optional[Tensor]]], tile_numel: int):
    """Pack aligned tensors into groups of flat slices with at most ``tile_numel`` elements.

    Small tensors share a group (one foreach call for many of them); large ones are cut
    into several groups. A tensor that cannot be viewed flat (non-contiguous, or not on
    CPU) forms a group of its own, whole.
    """
    group: List[tuple] = []
    group_numel = 0
    for tensors in zip(*tensor_lists):
        if not _can_tile(tensors, tile_numel):
            yield [tensors]
            continue
        for chunk in _flat_chunks(tensors, tile_numel):
            n = chunk[0].numel()
            if group and group_numel + n > tile_numel:
                yield group
                group, group_numel = [], 0
            group.append(chunk)
            group_numel += n
    if group:
        yield group


def _multi_tensor_update(params, grads, exp_avgs, exp_avg_sqs, steps, *, rule, lr, beta, maximize, tile_numel):
    # foreach ops need one device, dtype and (for the scalars) step per call
    buckets: dict = {}
    for i, (p, step) in enumerate(zip(params, steps)):
        buckets.setdefault((p.device, p.dtype, step), []).append(i)
    for (device, dtype, step), indices in buckets.items():
        lists = [[lst[i] for i in indices] for lst in (params, grads, exp_avgs, exp_avg_sqs)]
        c = _coefficients(rule, lr, beta, step, maximize)
        ops = _ForeachOps(_compute_dtype(dtype))
        if device.type != "cpu" or tile_numel is None:
            groups = [list(zip(*lists))]  # whole tensors, one foreach call per list
        else:
            groups = _tile_groups(lists, tile_numel)
        for group in groups:
            p, g, m, v = (list(t) for t in zip(*group))
            m = m if rule.needs_first_moment else None
            v = v if rule.needs_second_moment else None
            if dtype in _LOW_PRECISION:
                work = [None if t is None else [x.float() for x in t] for t in (p, g, m, v)]
                new = _update_math(rule, ops, c, *work)
                for dst, src in zip((p, m, v), new):
                    if dst is not None:
                        torch._foreach_copy_(dst, src)  # one rounding to the 16-bit dtype
            else:
                _update_math(rule, ops, c, p, g, m, v)


# --------------------------------------------------------------------------------------
# Fused CPU kernel (generated C++, see lightning_msvag/_cpu_kernel.py)
# --------------------------------------------------------------------------------------

#: Elements per parallel chunk of the fused CPU kernel (at::parallel_for grain size).
KERNEL_GRAIN = 2**15

_DTYPE = operator.attrgetter("dtype")
_IS_CPU = operator.attrgetter("is_cpu")


def fused_path_available() -> bool:
    """Whether the fused CPU kernel can run here: a C++ compiler exists (or the kernel is
    already built and cached) and no build failed in this process. Starts no build."""
    from . import _cpu_kernel

    return _cpu_kernel.available()


def _fused_cpu_update(params, grads, exp_avgs, exp_avg_sqs, steps, *, rule, lr, beta, maximize, tile_numel):
    """CPU tensors through the generated C++ kernel: one call per (step, dtype) bucket.

    Non-contiguous tensors, unsupported dtypes, and everything when the kernel cannot be
    built (one warning per process) take the multi-tensor path.
    """
    from . import _cpu_kernel

    kernel = _cpu_kernel.kernel()
    if kernel is None:  # warned once
        _multi_tensor_update(
            params, grads, exp_avgs, exp_avg_sqs, steps,
            rule=rule, lr=lr, beta=beta, maximize=maximize, tile_numel=tile_numel,
        )
        return
    need_m, need_v = rule.needs_first_moment, rule.needs_second_moment
    lists = [params, grads] + ([exp_avgs] if need_m else []) + ([exp_avg_sqs] if need_v else [])
    dtypes = set(map(_DTYPE, params))
    if (  # the common case, checked at C speed: one step count, one dtype, all CPU, contiguous
        len(dtypes) == 1 and dtypes.pop() in _cpu_kernel.DTYPES and len(set(steps)) == 1
        and all(all(map(_IS_CPU, lst)) and all(map(Tensor.is_contiguous, lst)) for lst in lists)
        and all(set(map(_DTYPE, lst)) == {params[0].dtype} for lst in lists[1:])
    ):
        kernel(
            rule, params[0].dtype, params, grads, exp_avgs if need_m else None, exp_avg_sqs if need_v else None,
            _coefficients(rule, lr, beta, steps[0], maximize), KERNEL_GRAIN,
        )
        return
    buckets: dict = {}
    rest = []
    for i, (p, g) in enumerate(zip(params, grads)):
        m = exp_avgs[i] if need_m else None
        v = exp_avg_sqs[i] if need_v else None
        if (
            p.is_cpu and g.is_cpu and p.dtype in _cpu_kernel.DTYPES and g.dtype == p.dtype
            and p.is_contiguous() and g.is_contiguous()
            and (m is None or (m.is_cpu and m.dtype == p.dtype and m.is_contiguous()))
            and (v is None or (v.is_cpu and v.dtype == p.dtype and v.is_contiguous()))
        ):
            buckets.setdefault((steps[i], p.dtype), []).append(i)
        else:
            rest.append(i)
    for (step, dtype), indices in buckets.items():
        kernel(
            rule, dtype,
            [params[i] for i in indices], [grads[i] for i in indices],
            [exp_avgs[i] for i in indices] if need_m else None,
            [exp_avg_sqs[i] for i in indices] if need_v else None,
            _coefficients(rule, lr, beta, step, maximize),
            KERNEL_GRAIN,
        )
    if rest:
        _multi_tensor_update(
            *([lst[i] for i in rest] for lst in (params, grads, exp_avgs, exp_avg_sqs, steps)),
            rule=rule, lr=lr, beta=beta, maximize=maximize, tile_numel=tile_numel,
        )


def dissected_adam(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Optional[Tensor]],
    exp_avg_sqs: List[Optional[Tensor]],
    steps: List[int],
    *,
    rule: UpdateRule,
    lr: float,
    beta: float,
    maximize: bool = False,
    foreach: bool = False,
    fused: bool = False,
    tile_numel: Optional[int] = CPU_TILE_NUMEL,
) -> None:
    """One in-place step of the family member ``rule`` on a list of tensors (docs/algorithm.md §1).

    ``steps[i]`` is the 1-based step number k of tensor i *including* this step.
    ``exp_avgs`` / ``exp_avg_sqs`` may hold ``None`` entries where the rule keeps no first
    / second moment. ``tile_numel`` sets the CPU tile size of the single- and multi-tensor
    paths; ``None`` processes whole tensors (as on CUDA). ``fused`` runs the generated C++
    kernel (CPU tensors only: a non-CPU tensor raises ``ValueError``).
    """
    if not params:
        return
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"invalid learning rate {lr}")
    if fused:
        if foreach:
            raise ValueError("fused and foreach cannot both be True")
        if not all(map(_IS_CPU, params)):
            devices = {p.device.type for p in params if p.device.type != "cpu"}
            raise ValueError(
                f"fused=True is a CPU kernel; parameters on {sorted(devices)} cannot use it "
                "(use foreach=True or the default)"
            )
        update = _fused_cpu_update
    else:
        update = _multi_tensor_update if foreach else _single_tensor_update
    update(
        params, grads, exp_avgs, exp_avg_sqs, steps,
        rule=rule, lr=lr, beta=beta, maximize=maximize, tile_numel=tile_numel,
    )
