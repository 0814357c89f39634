"""The paths of the "Dissecting Adam" update: single-tensor, multi-tensor, fused kernel (docs/algorithm.md §1).

The math lives in :mod:`lightning_msvag.rule` (:class:`~lightning_msvag.rule.UpdateRule`,
the coefficients, :func:`~lightning_msvag.rule._update_math`); this module runs it over
lists of tensors. Every path runs *that* ``_update_math``, with its own ``ops`` backend:

* single-tensor path (``foreach=False``): ``ops`` are in-place torch ops on one tensor (or
  one CPU tile of it). With ``tile_numel=None`` this is the plain, untiled reference path.
* multi-tensor path (``foreach=True``): ``ops`` are ``torch._foreach_*`` ops over lists;
  the default on CUDA.
* fused CPU kernel (``fused=True``, the default on CPU): ``ops`` emit C++ expressions;
  :mod:`lightning_msvag._cpu_kernel` traces ``_update_math`` once per rule of
  :data:`~lightning_msvag.rule.RULES` into a multi-tensor C++ kernel (one call per param group: ``at::parallel_for``
  over the concatenated index space of all its tensors, each element read once and written
  once; the same traffic as torch's fused Adam: read g, θ, m~, v~, write θ, m~, v~, and no
  temporaries). The kernel is compiled once per machine and version (about 1-3 s with the
  system C++ compiler), cached on disk under ``$LIGHTNING_MSVAG_CACHE`` or
  ``~/.cache/lightning_msvag`` behind a file lock (safe when several DDP ranks start at
  once), announced in one line when it is built. Where no compiler exists (or the build
  fails) one warning is raised and the multi-tensor path is used.

The scalars (bias correction, ρ, the coefficients of γ, the step size) are computed in
Python, once per (step, group), by :func:`~lightning_msvag.rule._coefficients`; every path uses them.

16-bit parameters (float16, bfloat16): every path computes the step in float32 from the
16-bit values of θ, g, m~, v~ and rounds θ, m~, v~ to the parameter dtype once at the end
(round to nearest even). float64 computes in float64, float32 in float32.

On CPU the single- and multi-tensor paths work on *tiles*: flat slices of at most
:data:`CPU_TILE_NUMEL` elements, so that their many memory passes hit cache.

Imports run one way: :mod:`~lightning_msvag.rule` ← backends (:mod:`~lightning_msvag._cpu_kernel`)
← this module ← :mod:`lightning_msvag.optimizers`. ``UpdateRule``, ``RULES``, ``RHO_CAP``,
``bias_correction`` and ``variance_ratio`` are re-exported here (their public import path
since the first release); they are defined in :mod:`lightning_msvag.rule`.
"""

from __future__ import annotations

import math
import operator
from typing import Iterator, List, Optional, Sequence

import torch
from torch import Tensor

from . import _cpu_kernel
from .rule import (
    RHO_CAP,
    RULES,
    UpdateRule,
    _coefficients,
    _gamma_coefficients,
    _gamma_math,
    _sign_factor_math,
    _update_math,
    bias_correction,
    variance_ratio,
)

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
    "rule_variance_factor",
]

#: Elements per tile on CPU (single- and multi-tensor paths). 2**20 float32 values are
#: 4 MiB per buffer: the live buffers of an M-SVAG tile stay in a 32 MiB L3 cache.
CPU_TILE_NUMEL = 2**20

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------
# The torch backends of the update's ops
# --------------------------------------------------------------------------------------


class _TensorOps:
    """:class:`~lightning_msvag.rule.UpdateOps` on single tensors (in place where the name says so)."""

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
    rsub_scalar = staticmethod(lambda x, s: torch.rsub(x, s))
    sqrt_ = staticmethod(lambda x: x.sqrt_())
    erf_ = staticmethod(lambda x: x.erf_())
    ema_ = staticmethod(lambda v, x, decay, w: v.mul_(decay).add_(x, alpha=w))


class _ForeachOps:
    """:class:`~lightning_msvag.rule.UpdateOps` on lists of tensors (``torch._foreach_*``)."""

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

    sqrt_ = staticmethod(lambda x: torch._foreach_sqrt_(x) or x)
    erf_ = staticmethod(lambda x: torch._foreach_erf_(x) or x)

    @staticmethod
    def rsub_scalar(x, s):
        y = torch._foreach_neg(x)
        torch._foreach_add_(y, s)
        return y

    @staticmethod
    def ema_(v, x, decay, w):
        torch._foreach_mul_(v, decay)
        torch._foreach_add_(v, x, alpha=w)
        return v


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


def rule_variance_factor(rule: UpdateRule, exp_avg: Tensor, exp_avg_sq: Tensor, *, beta: float, step: int,
                         sign_factor: bool = False) -> Tensor:
    """γ of the step ``step`` of any variance-adapted ``rule`` from its buffers m~, v~.

    The γ of :func:`variance_adaptation_factor`, for every rule: with ``variance="minibatch"``
    v~ holds the mini-batch buffer (docs/algorithm.md §1.1), and γ is a real estimate at
    k = 1 too. For a sign rule this is the non-sign rule's γ = 1/(1 + η²) unless
    ``sign_factor=True``, which gives the factor γ^s the sign step applied (erf or √γ,
    docs/algorithm.md §1.2). Values in [0, 1], 0 where m = v = 0; float32 for 16-bit inputs.
    """
    if not rule.variance_adaptation:
        raise ValueError(f"{rule} has no variance adaptation")
    compute = _compute_dtype(exp_avg.dtype)
    if step == 1 and not rule.needs_batch_variance:
        return (exp_avg != 0).to(compute)  # s = 0: γ = 1 (and γ^s = 1) wherever m ≠ 0
    kappa, upper = _gamma_coefficients(rule, beta, step)
    ops = _TensorOps(compute)
    gamma = _gamma_math(ops, exp_avg.to(compute), exp_avg_sq.to(compute), kappa, upper)
    if sign_factor and rule.sign:
        gamma = _sign_factor_math(ops, gamma, upper, rule.sign_factor)
        return gamma.div_(math.sqrt(upper)) if rule.sign_factor == "sqrt" else gamma
    return gamma.div_(upper)


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


def _batch_variances_of(params: Sequence[Tensor]) -> List[Tensor]:
    """σ̂² of each parameter, left by :class:`~lightning_msvag.batch_variance.BatchVarianceEstimator`."""
    found = [getattr(p, "grad_batch_variance", None) for p in params]
    if any(s is None for s in found):
        raise RuntimeError(
            "this update needs the mini-batch variance estimate (p.grad_batch_variance): record the backward "
            "pass with lightning_msvag.batch_variance.BatchVarianceEstimator or add BatchVarianceCallback"
        )
    return found


def _minibatch_update(params, grads, exp_avgs, exp_avg_sqs, steps, *, batch_variances, foreach, rule, lr, beta,
                      maximize, tile_numel):
    """Rules with ``variance="minibatch"`` (docs/algorithm.md §1.1): the one ``_update_math`` with the extra
    operand σ̂². Single-tensor (``foreach=False``) or multi-tensor (bucketed by device, dtype and step), on
    CPU in tiles as the other rules' paths. ``fused=True`` goes to :func:`_fused_minibatch_update`."""
    if len(batch_variances) != len(params):
        raise ValueError(f"{len(batch_variances)} batch variances for {len(params)} parameters")
    buckets: dict = {}
    for i, (p, step) in enumerate(zip(params, steps)):
        buckets.setdefault((p.device, p.dtype, step) if foreach else i, []).append(i)
    for indices in buckets.values():
        first = params[indices[0]]
        compute = _compute_dtype(first.dtype)
        c = _coefficients(rule, lr, beta, steps[indices[0]], maximize)
        lists = [[lst[i] for i in indices] for lst in (params, grads, exp_avgs, exp_avg_sqs)]
        # σ̂² is only read: in the compute dtype (a copy only where the dtype or device differs)
        lists.append([batch_variances[i].to(device=first.device, dtype=compute) for i in indices])
        if first.device.type != "cpu" or tile_numel is None:
            groups = [list(zip(*lists))]
        elif foreach:
            groups = _tile_groups(lists, tile_numel)
        else:
            groups = [[chunk] for chunk in _flat_chunks(next(zip(*lists)), tile_numel)] if _can_tile(
                next(zip(*lists)), tile_numel) else [list(zip(*lists))]
        ops = _ForeachOps(compute) if foreach else _TensorOps(compute)
        for group in groups:
            p, g, m, v, s = (list(t) for t in zip(*group))
            low_precision = first.dtype in _LOW_PRECISION
            work = [[x.float() for x in t] for t in (p, g, m, v)] if low_precision else [p, g, m, v]
            if foreach:
                new = _update_math(rule, ops, c, *work, s)
                pairs = list(zip((p, m, v), new))
            else:
                new = _update_math(rule, ops, c, *(t[0] for t in work), s[0])
                pairs = [([dst[0]], [src]) for dst, src in zip((p, m, v), new)]
            if low_precision:
                for dst, src in pairs:
                    torch._foreach_copy_(dst, src)  # one rounding to the 16-bit dtype


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
    return _cpu_kernel.available()


def _fused_cpu_update(params, grads, exp_avgs, exp_avg_sqs, steps, *, rule, lr, beta, maximize, tile_numel):
    """CPU tensors through the generated C++ kernel: one call per (step, dtype) bucket.

    Non-contiguous tensors, unsupported dtypes, and everything when the kernel cannot be
    built (one warning per process) take the multi-tensor path.
    """
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


def _fused_minibatch_update(params, grads, exp_avgs, exp_avg_sqs, steps, *, batch_variances, foreach, rule, lr,
                            beta, maximize, tile_numel):
    """Mini-batch rules through the generated C++ kernel (its extra operand S = σ̂²): one call per
    (step, dtype) bucket; tensors it cannot take, or everything when it cannot be built, take
    :func:`_minibatch_update`'s multi-tensor path."""
    kernel = _cpu_kernel.kernel()
    if len(batch_variances) != len(params):
        raise ValueError(f"{len(batch_variances)} batch variances for {len(params)} parameters")
    buckets: dict = {}
    rest = []
    for i, (p, g, m, v, s) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, batch_variances)):
        if kernel is not None and p.dtype in _cpu_kernel.DTYPES and all(
            t.is_cpu and t.dtype == p.dtype and t.is_contiguous() for t in (p, g, m, v, s)
        ):
            buckets.setdefault((steps[i], p.dtype), []).append(i)
        else:
            rest.append(i)
    for (step, dtype), indices in buckets.items():
        kernel(
            rule, dtype, *([lst[i] for i in indices] for lst in (params, grads, exp_avgs, exp_avg_sqs)),
            _coefficients(rule, lr, beta, step, maximize), KERNEL_GRAIN, [batch_variances[i] for i in indices],
        )
    if rest:
        _minibatch_update(
            *([lst[i] for i in rest] for lst in (params, grads, exp_avgs, exp_avg_sqs, steps)),
            batch_variances=[batch_variances[i] for i in rest], foreach=True, rule=rule, lr=lr, beta=beta,
            maximize=maximize, tile_numel=tile_numel,
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
    batch_variances: Optional[List[Tensor]] = None,
) -> None:
    """One in-place step of the family member ``rule`` on a list of tensors (docs/algorithm.md §1).

    ``steps[i]`` is the 1-based step number k of tensor i *including* this step.
    ``exp_avgs`` / ``exp_avg_sqs`` may hold ``None`` entries where the rule keeps no first
    / second moment. ``tile_numel`` sets the CPU tile size of the single- and multi-tensor
    paths; ``None`` processes whole tensors (as on CUDA). ``fused`` runs the generated C++
    kernel (CPU tensors only: a non-CPU tensor raises ``ValueError``).
    ``batch_variances``: σ̂² per tensor for ``variance="minibatch"`` rules (default: each
    parameter's ``grad_batch_variance``; ``RuntimeError`` if one is missing). The fused CPU
    kernel takes σ̂² as its extra operand (it must have the parameter's dtype, else that
    tensor takes the multi-tensor path).
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
    if rule.needs_batch_variance:  # the extra operand σ̂² (docs/algorithm.md §1.1)
        (_fused_minibatch_update if fused else _minibatch_update)(
            params, grads, exp_avgs, exp_avg_sqs, steps,
            batch_variances=_batch_variances_of(params) if batch_variances is None else batch_variances,
            foreach=foreach or fused, rule=rule, lr=lr, beta=beta, maximize=maximize, tile_numel=tile_numel,
        )
        return
    update(
        params, grads, exp_avgs, exp_avg_sqs, steps,
        rule=rule, lr=lr, beta=beta, maximize=maximize, tile_numel=tile_numel,
    )
