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

Complex parameters: every path steps them as (real, imaginary) pairs, through
``torch.view_as_real`` of θ, g, m~ and v~ (the paper's math is per real coordinate, as in
torch's optimizers); the buffers keep the parameter's complex shape and v~ holds the
per-real-coordinate squares (re² and im² in its real and imaginary parts).

AMP: ``grad_scale`` (a GradScaler's scale) is folded into the gradient multiplier of the
math (``Coefficients.grad_sign`` = ±1/scale), so the gradients are unscaled inside the
update, on every path; a nonzero ``found_inf`` skips the update.

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
import warnings
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _cpu_kernel, _triton_kernel
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
    "fused_devices",
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

    scale_grad = staticmethod(lambda g, s: g if s == 1.0 else torch.mul(g, s))  # ±1/grad_scale
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

    scale_grad = staticmethod(lambda g, s: g if s == 1.0 else torch._foreach_mul(g, s))  # ±1/grad_scale
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


class _TensorScalars:
    """The scalar operations of :func:`~lightning_msvag.rule._coefficients` on 0-dim tensors: under
    ``torch.compile`` the per-step scalars come from each tensor's step counter inside the graph
    (no host read, no recompilation as k grows), as the Triton kernel computes them on the device."""

    symbolic = True
    where = staticmethod(torch.where)

    @staticmethod
    def minimum(a, b):
        return torch.clamp(a, max=b)


class _CompiledOps:
    """:class:`~lightning_msvag.rule.UpdateOps` for ``torch.compile``: single tensors, every operation
    out of place (the in-place names may, not must, update), scalars that may be 0-dim tensors.
    Inductor fuses one tensor's whole update into one pass over θ, g, m~, v~; out of place, the
    update can be traced twice (γ and the plain step) and selected per tensor on k > 1."""

    def __init__(self, dtype: torch.dtype):
        self.tiny = torch.finfo(dtype).tiny

    scale_grad = staticmethod(lambda g, s: g if isinstance(s, float) and s == 1.0 else g * s)
    lerp_ = staticmethod(lambda m, g, w: torch.lerp(m, g, w))
    ema_square_ = staticmethod(lambda v, g, beta, w: v * beta + g * g * w)
    sign = staticmethod(torch.sign)
    mul = staticmethod(torch.mul)
    add_scaled = staticmethod(lambda a, b, k: a + b * k)
    add_scalar_ = staticmethod(lambda a, s: a + s)
    div_ = staticmethod(lambda a, b: a / b)
    clamp_ = staticmethod(lambda x, lo, hi: torch.clamp_max(torch.clamp_min(x, lo), hi))
    addcmul_ = staticmethod(lambda p, a, b, s: p + a * b * s)
    add_ = staticmethod(lambda p, d, s: p + d * s)
    rsub_scalar = staticmethod(lambda x, s: s - x)
    sqrt_ = staticmethod(torch.sqrt)
    erf_ = staticmethod(torch.erf)
    ema_ = staticmethod(lambda v, x, decay, w: v * decay + x * w)


def _default_paths(params: List[Tensor], foreach: Optional[bool], fused: Optional[bool], rule: UpdateRule):
    """Resolve ``foreach=None`` / ``fused=None`` to the fastest path for these tensors.

    CPU, every rule: fused, the generated C++ multi-tensor kernel (one pass over memory,
    one call per group), unless it cannot be built here (no C++ compiler: one warning,
    then multi-tensor). CUDA: fused, the generated Triton multi-tensor kernel (one launch
    per group and dtype), unless Triton is missing (one warning, then multi-tensor).
    Other devices: multi-tensor. An explicit ``foreach`` keeps ``fused=None`` off. Measured in
    benchmarks/optimizer_step.py. (``fused=True`` with tensors the fused kernel cannot
    step raises ``RuntimeError`` in the step, as torch's fused optimizers do.)
    """
    if fused is None and foreach is None:
        # the common case at C speed: reading p.device per tensor costs ~0.3 µs × 2,000 tensors a step
        device_types = ("cpu",) if all(map(_IS_CPU, params)) else {p.device.type for p in params}
        fused = _fused_unsupported(params) is None and all(map(fused_path_available, device_types))
        if not fused and "cuda" in device_types and not fused_path_available("cuda"):
            _warn_no_device_kernel()
    if foreach is None:
        foreach = not fused and not torch.jit.is_scripting()
    return bool(foreach), bool(fused)


#: Inside ``torch.compile``, CPU groups step through :func:`_cpu_step_op` (the eager step as one
#: operator); False traces the update for inductor as on CUDA (measured in benchmarks/compiled_step.py).
COMPILED_CPU_STEP_AS_OPERATOR = True


@torch.library.custom_op("lightning_msvag::cpu_step", mutates_args=("params", "exp_avgs", "exp_avg_sqs"),
                         device_types="cpu")
def _cpu_step_op(
    params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
    steps: List[Tensor], batch_variances: List[Tensor], rule: str, lr: float,
    lr_tensor: Optional[Tensor], beta: float, maximize: bool, tile_numel: int, foreach: Optional[bool],
    fused: Optional[bool],
) -> None:
    """The eager CPU step of a group (the generated C++ kernel where it builds), as one operator
    that ``torch.compile`` calls and does not trace (docs/algorithm.md §3): on CPU it is faster
    than the update inductor generates from the same math, and bitwise the eager step. ``steps``
    are the (already advanced) counters; ``exp_avgs``, ``exp_avg_sqs``: empty where the rule keeps
    no such buffer; ``batch_variances``: σ̂² of each tensor, or empty;
    ``rule``: the :class:`UpdateRule`'s fields, ``name=repr`` joined by ``;``;
    ``foreach``/``fused``: the group's settings, resolved as the eager step resolves them."""
    rule_ = _rule_from_string(rule)
    foreach, fused = _default_paths(params, foreach, fused, rule_)
    none = [None] * len(params)
    _run_step(params, grads, exp_avgs or none, exp_avg_sqs or none, [int(k) for k in steps], rule=rule_,
              lr=float(lr_tensor) if lr_tensor is not None else lr, beta=beta, maximize=maximize,
              foreach=foreach, fused=fused, tile_numel=tile_numel or None, batch_variances=batch_variances or None)


@_cpu_step_op.register_fake
def _cpu_step_fake(params, grads, exp_avgs, exp_avg_sqs, steps, batch_variances, rule, lr, lr_tensor, beta, maximize,
                   tile_numel, foreach, fused) -> None:
    return None


def _rule_string(rule: UpdateRule) -> str:
    return ";".join(f"{field}={getattr(rule, field)!r}" for field in UpdateRule.__dataclass_fields__)


_RULES_BY_STRING: dict = {}


def _rule_from_string(string: str) -> UpdateRule:
    import ast

    if string not in _RULES_BY_STRING:
        fields = (item.split("=", 1) for item in string.split(";"))
        _RULES_BY_STRING[string] = UpdateRule(**{k: ast.literal_eval(v) for k, v in fields})
    return _RULES_BY_STRING[string]


def _compiled_cpu_step(params, grads, exp_avgs, exp_avg_sqs, step_tensors, *, rule, lr, beta, maximize, tile_numel,
                       foreach, fused, batch_variances=None) -> None:
    """:func:`_cpu_step_op` from inside a compiled step."""
    lr_tensor = lr if isinstance(lr, Tensor) else None
    present = lambda buffers: [t for t in buffers if t is not None]  # noqa: E731  (a rule keeps all or none)
    _cpu_step_op(params, grads, present(exp_avgs), present(exp_avg_sqs), step_tensors, batch_variances or [],
                 _rule_string(rule), 0.0 if lr_tensor is not None else float(lr), lr_tensor, float(beta),
                 bool(maximize), int(tile_numel or 0), foreach, fused)


def _compiled_update(params, grads, exp_avgs, exp_avg_sqs, step_tensors, *, rule, lr, beta, maximize,
                     batch_variances=None) -> None:
    """The update under ``torch.compile`` (docs/algorithm.md §3): the one :func:`~lightning_msvag.rule._update_math`
    per tensor on :class:`_CompiledOps`, with the scalars of :func:`~lightning_msvag.rule._coefficients`
    computed in float64 from the tensor's own (already advanced) step counter. Rules whose first
    step is the plain step trace both bodies and select θ on k > 1 (m~, v~ agree). 16-bit tensors
    compute in float32 and round once; complex ones step their real views."""
    params, grads, exp_avgs, exp_avg_sqs = _real_views(params, grads, exp_avgs, exp_avg_sqs)
    branches = (False, True) if rule.variance_adaptation and not rule.needs_batch_variance else (rule.variance_adaptation,)
    for i, (p, g, m, v, k) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, step_tensors)):
        compute = _compute_dtype(p.dtype)
        ops = _CompiledOps(compute)
        work = [None if t is None else t.to(compute) for t in (p, g, m, v)]
        s = None if batch_variances is None else batch_variances[i].to(compute)
        k64 = k.to(torch.float64)
        results = []
        for va in branches:
            c = _coefficients(rule, lr, beta, k64, maximize, ops=_TensorScalars, va=va)
            c = c._replace(**{f: v_.to(compute) for f, v_ in c._asdict().items() if isinstance(v_, Tensor)})
            results.append(_update_math(rule, ops, c, *work, s))
        p_new, m_new, v_new = results[-1]
        if len(results) == 2:  # k = 1: the plain step (γ = 1 exactly); k > 1: the γ step
            p_new = torch.where(k > 1, p_new, results[0][0])
        p.copy_(p_new)
        if m is not None and m_new is not None:
            m.copy_(m_new)
        if v is not None and v_new is not None:
            v.copy_(v_new)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def variance_adaptation_factor(
    exp_avg: Tensor, exp_avg_sq: Tensor, *, beta: float, step: int, direction: str = "momentum"
) -> Tensor:
    """γ of the step ``step`` from the raw moving averages m~ and v~ (docs/algorithm.md §1).

    ``direction="momentum"`` gives M-SVAG's γ = m²/(m² + ρ s), ``"gradient"`` SVAG's
    γ = m²/(m² + s). γ ∈ [0, 1], and γ = 0 where m = v = 0. At k = 1, s = 0 exactly, so
    γ = 1 wherever m ≠ 0. Returned in float32 for 16-bit inputs, else in their dtype.
    Complex buffers (a complex parameter) give γ of the real view: shape ``exp_avg.shape
    + (2,)``, the (real, imaginary) coordinates the optimizers step (real dtype).
    """
    if exp_avg.is_complex():
        exp_avg, exp_avg_sq = torch.view_as_real(exp_avg), torch.view_as_real(exp_avg_sq)
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


def _step_coefficients(rule, lr, beta, step, maximize, grad_scale):
    """:func:`~lightning_msvag.rule._coefficients`, with 1/``grad_scale`` folded into the
    gradient multiplier (AMP: the gradients are unscaled inside the update)."""
    c = _coefficients(rule, lr, beta, step, maximize)
    return c if grad_scale == 1.0 else c._replace(grad_sign=c.grad_sign / grad_scale)


def _single_tensor_update(
    params, grads, exp_avgs, exp_avg_sqs, steps, *, rule, lr, beta, maximize, tile_numel, grad_scale=1.0
):
    for param, grad, exp_avg, exp_avg_sq, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        tensors = (param, grad, exp_avg, exp_avg_sq)
        chunks = _flat_chunks(tensors, tile_numel) if _can_tile(tensors, tile_numel) else [tensors]
        c = _step_coefficients(rule, lr, beta, step, maximize, grad_scale)
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


def _multi_tensor_update(
    params, grads, exp_avgs, exp_avg_sqs, steps, *, rule, lr, beta, maximize, tile_numel, grad_scale=1.0
):
    # foreach ops need one device, dtype and (for the scalars) step per call
    buckets: dict = {}
    for i, (p, step) in enumerate(zip(params, steps)):
        buckets.setdefault((p.device, p.dtype, step), []).append(i)
    for (device, dtype, step), indices in buckets.items():
        lists = [[lst[i] for i in indices] for lst in (params, grads, exp_avgs, exp_avg_sqs)]
        c = _step_coefficients(rule, lr, beta, step, maximize, grad_scale)
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


def fused_path_available(device_type: str = "cpu") -> bool:
    """Whether the fused kernel for ``device_type`` can run here. CPU: a C++ compiler exists
    (or the kernel is already built and cached) and no build failed in this process. CUDA:
    Triton imports and no build or launch failed in this process. Starts no build."""
    if device_type == "cpu":
        return _cpu_kernel.available()
    return device_type == "cuda" and _triton_kernel.available()


def _device_kernel_for(params: Sequence[Tensor]) -> bool:
    """A fused group goes to the device (Triton) kernel: none of its tensors is on the CPU
    (a group that mixes devices steps its CPU tensors in the C++ kernel, the rest multi-tensor)."""
    return not any(map(_IS_CPU, params))


_warned_no_device_kernel = False


def _warn_no_device_kernel() -> None:
    global _warned_no_device_kernel
    if not _warned_no_device_kernel:
        _warned_no_device_kernel = True
        warnings.warn(
            "lightning-msvag: the fused CUDA kernel (Triton) is not available here "
            f"({_triton_kernel.unavailable_reason()}); using the multi-tensor path",
            RuntimeWarning,
            stacklevel=4,
        )


def _fused_device_update(
    params, grads, exp_avgs, exp_avg_sqs, step_tensors, *, rule, lr, beta, maximize, grad_scale=None, found_inf=None
) -> bool:
    """CUDA tensors through the generated Triton kernel, one launch per (device, dtype).

    ``step_tensors`` are the (already advanced) 0-dim float32 counters on the parameters'
    device; ``lr``, ``grad_scale`` and ``found_inf`` may be device tensors: nothing is read
    back to the host (docs/algorithm.md §3). Returns ``False`` (after one warning per
    process) where the kernel cannot run, so the caller takes the multi-tensor path.
    """
    if not _triton_kernel.available():
        _warn_no_device_kernel()
        return False
    buckets: dict = {}
    for i, p in enumerate(params):
        buckets.setdefault((p.device, p.dtype), []).append(i)
    done = 0
    for indices in buckets.values():
        try:
            _triton_kernel.fused_update(
                rule,
                *([lst[i] for i in indices] for lst in (params, grads, exp_avgs, exp_avg_sqs, step_tensors)),
                lr=lr, beta=beta, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf,
            )
        except RuntimeError:
            if done:  # part of the step is written: redoing it on another path would step twice
                raise
            _warn_no_device_kernel()
            return False
        done += 1
    return True


def _fused_cpu_update(
    params, grads, exp_avgs, exp_avg_sqs, steps, *, rule, lr, beta, maximize, tile_numel, grad_scale=1.0
):
    """CPU tensors through the generated C++ kernel: one call per (step, dtype) bucket.

    Non-contiguous tensors, unsupported dtypes, and everything when the kernel cannot be
    built (one warning per process) take the multi-tensor path.
    """
    kernel = _cpu_kernel.kernel()
    if kernel is None:  # warned once
        _multi_tensor_update(
            params, grads, exp_avgs, exp_avg_sqs, steps,
            rule=rule, lr=lr, beta=beta, maximize=maximize, tile_numel=tile_numel, grad_scale=grad_scale,
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
            _step_coefficients(rule, lr, beta, steps[0], maximize, grad_scale), KERNEL_GRAIN,
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
            _step_coefficients(rule, lr, beta, step, maximize, grad_scale),
            KERNEL_GRAIN,
        )
    if rest:
        _multi_tensor_update(
            *([lst[i] for i in rest] for lst in (params, grads, exp_avgs, exp_avg_sqs, steps)),
            rule=rule, lr=lr, beta=beta, maximize=maximize, tile_numel=tile_numel, grad_scale=grad_scale,
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
    lr: Union[float, Tensor],
    beta: float,
    maximize: bool = False,
    foreach: bool = False,
    fused: bool = False,
    tile_numel: Optional[int] = CPU_TILE_NUMEL,
    grad_scale: Optional[Union[float, Tensor]] = None,
    found_inf: Optional[Tensor] = None,
    batch_variances: Optional[List[Tensor]] = None,
) -> None:
    """One in-place step of the family member ``rule`` on a list of tensors (docs/algorithm.md §1).

    ``steps[i]`` is the 1-based step number k of tensor i *including* this step.
    ``exp_avgs`` / ``exp_avg_sqs`` may hold ``None`` entries where the rule keeps no first
    / second moment. ``lr``: a number or a 1-element tensor. ``tile_numel`` sets the CPU
    tile size of the single- and multi-tensor paths; ``None`` processes whole tensors (as
    on CUDA). ``fused`` runs the fused kernel (devices of :func:`fused_devices` only: other
    tensors raise ``RuntimeError``, as torch's fused optimizers do). Complex tensors are
    stepped as (real, imaginary) pairs. ``grad_scale``: the gradients are divided by it
    inside the update (AMP); ``found_inf`` nonzero: nothing is updated (the caller's step
    counts are its own). Everything is checked before any tensor is written.
    ``batch_variances``: σ̂² per tensor for ``variance="minibatch"`` rules (default: each
    parameter's ``grad_batch_variance``; ``RuntimeError`` if one is missing). The fused CPU
    kernel takes σ̂² as its extra operand (it must have the parameter's dtype, else that
    tensor takes the multi-tensor path); the CUDA kernel has no such operand (multi-tensor).
    """
    if not params:
        return
    _check_step_inputs(params, grads, lr=lr, foreach=foreach, fused=fused)
    if found_inf is not None and _amp_found_inf(found_inf):
        return
    if rule.needs_batch_variance and grad_scale is not None:
        raise RuntimeError("the mini-batch variance estimate does not take a GradScaler's scaled gradients")
    _run_step(
        params, grads, exp_avgs, exp_avg_sqs, steps, rule=rule, lr=lr, beta=beta, maximize=maximize,
        foreach=foreach, fused=fused, tile_numel=tile_numel, grad_scale=grad_scale, batch_variances=batch_variances,
    )


def fused_devices() -> Tuple[str, ...]:
    """Device types the fused path has a kernel for: the one place that says so (a device
    joins here when its kernel does). CUDA: the Triton kernel (where Triton is missing, one
    warning and the multi-tensor path)."""
    return ("cpu", "cuda")


#: dtypes the fused kernel steps: its own, and the complex ones whose real view is one of them
_FUSED_DTYPES = frozenset(_cpu_kernel.DTYPES) | {torch.complex64, torch.complex128, torch.complex32}
_IS_SPARSE = operator.attrgetter("is_sparse")


def _fused_unsupported(params: Sequence[Tensor]) -> Optional[Tensor]:
    """The first tensor the fused path cannot step (device or dtype), or ``None``."""
    devices = fused_devices()
    if all(map(_IS_CPU, params)) and set(map(_DTYPE, params)) <= _FUSED_DTYPES:
        return None  # the common case, at C speed
    for p in params:
        if p.device.type not in devices or p.dtype not in _FUSED_DTYPES:
            return p
    return None


def _check_lr(lr) -> None:
    """A finite number ≥ 0, or a 1-element tensor holding one (torch's wording for others).

    A tensor off the CPU is not read here (that would synchronise): its path reads it.
    """
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr.is_cpu:
            return
        value = float(lr)
    else:
        value = lr
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"invalid learning rate {value!r} (need a finite number >= 0)")


def _check_step_inputs(params, grads, *, lr, foreach: bool, fused: bool) -> None:
    """Everything a step can refuse, checked before anything is written (a refused step is a no-op)."""
    _check_lr(lr)
    if any(map(_IS_SPARSE, grads)):
        raise RuntimeError("the optimizers of lightning-msvag do not support sparse gradients")
    if fused:
        if foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        bad = _fused_unsupported(params)
        if bad is not None:
            # torch's wording (torch/optim/optimizer.py, _device_dtype_check_for_fused)
            raise RuntimeError(
                "`fused=True` requires all the params to be floating point Tensors of supported devices: "
                f"{list(fused_devices())} but {bad.dtype} and {bad.device.type} "
                "(lightning-msvag: complex parameters are accepted too; use foreach=True or the default "
                "fused=None for other devices)"
            )


def _amp_found_inf(found_inf) -> bool:
    """A GradScaler's ``found_inf`` is nonzero: the step is skipped (a host read of the flag)."""
    return bool(float(found_inf) != 0.0)


def _real_views(params, grads, exp_avgs, exp_avg_sqs):
    """Complex tensors as their (…, 2) real views (torch's ``_view_as_real``); other lists unchanged."""
    if not any(map(torch.is_complex, params)):
        return params, grads, exp_avgs, exp_avg_sqs

    def real(t):
        return t if t is None or not t.is_complex() else torch.view_as_real(t)

    # a gradient is only read: a lazily conjugated one may be materialised (θ, m~, v~ are written in place)
    grads = [g.resolve_conj() if g.is_complex() else g for g in grads]
    return tuple([real(t) for t in lst] for lst in (params, grads, exp_avgs, exp_avg_sqs))


def _run_step(
    params, grads, exp_avgs, exp_avg_sqs, steps, *, rule, lr, beta, maximize, foreach, fused, tile_numel,
    grad_scale=None, batch_variances=None,
) -> None:
    """:func:`dissected_adam` after its checks (the optimizers check every group first)."""
    if not params:
        return
    if rule.needs_batch_variance:  # the extra operand σ̂² (docs/algorithm.md §1.1); no complex support
        (_fused_minibatch_update if fused else _minibatch_update)(
            params, grads, exp_avgs, exp_avg_sqs, steps,
            batch_variances=_batch_variances_of(params) if batch_variances is None else batch_variances,
            foreach=foreach or fused, rule=rule, lr=float(lr), beta=beta, maximize=maximize, tile_numel=tile_numel,
        )
        return
    params, grads, exp_avgs, exp_avg_sqs = _real_views(params, grads, exp_avgs, exp_avg_sqs)
    if fused and _device_kernel_for(params):
        # the functional API counts steps in ints: the device kernel reads them from the device
        device_steps = [torch.tensor(float(k), dtype=torch.float32, device=p.device) for k, p in zip(steps, params)]
        if _fused_device_update(
            params, grads, exp_avgs, exp_avg_sqs, device_steps, rule=rule, lr=lr, beta=beta, maximize=maximize,
            grad_scale=grad_scale,
        ):
            return
        fused, foreach = False, True  # warned once
    if fused:
        update = _fused_cpu_update
    else:
        update = _multi_tensor_update if foreach else _single_tensor_update
    update(
        params, grads, exp_avgs, exp_avg_sqs, steps,
        rule=rule, lr=float(lr), beta=beta, maximize=maximize, tile_numel=tile_numel,
        grad_scale=1.0 if grad_scale is None else float(grad_scale),
    )
