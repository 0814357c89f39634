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
=========  ===========  =====  ===================

(Adam is momentum + sign + variance adaptation; the project uses ``torch.optim.Adam`` for it.)

Two execution paths, as in ``torch.optim``: a single-tensor path (a loop over tensors) and a
multi-tensor path (``torch._foreach_*`` over lists). They compute the same numbers.

On CPU, both paths work on *tiles*: flat slices of at most :data:`CPU_TILE_NUMEL` elements.
Each tile is read from memory once, all the arithmetic (about ten elementwise operations
for M-SVAG) happens while the tile sits in cache, and each buffer is written back once. A
step then moves the minimum of 7 floats per parameter (read g, θ, m~, v~; write θ, m~, v~),
the same as torch's fused Adam, instead of one memory pass per operation. On CUDA the
tensors are processed whole (kernel launches, not memory passes, are the cost there).

A third path, *fused* (the default on CPU wherever torch.compile and a C++ compiler are
available), runs each large tensor (>= :data:`FUSED_MIN_NUMEL` elements) through one
``torch.compile``-generated C++ loop that does the whole update per element, as torch's
fused Adam does; smaller tensors are gathered into flat buffers and updated by one call. Its compile cost is paid at
the first step that reaches it, once per process and (rule, float64-or-not): 10-35 s on 2
cores with a cold cache, 1-3 s when inductor's on-disk cache (``/tmp/torchinductor_$USER``)
already holds the kernel.
"""

from __future__ import annotations

import functools
import math
import shutil
import types
import warnings
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "UpdateRule",
    "RHO_CAP",
    "CPU_TILE_NUMEL",
    "bias_correction",
    "variance_ratio",
    "variance_adaptation_factor",
    "dissected_adam",
]

#: Cap on ρ from the authors' reference code: at k = 1, ρ = 1 and 1/(1−ρ) would be infinite.
RHO_CAP = 0.9999

#: Elements per tile on CPU. 2**20 float32 values are 4 MiB per buffer: the six live
#: buffers of an M-SVAG tile (θ, g, m~, v~ and two temporaries) stay in a 32 MiB L3 cache.
#: Smaller tiles measured slower (more, shorter parallel regions); see benchmarks/.
CPU_TILE_NUMEL = 2**20

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class UpdateRule:
    """One member of the 2×2 family (paper Fig. 1), plus SVAG's choice of direction.

    Args:
        direction: ``"momentum"`` updates along the bias-corrected moving average m,
            ``"gradient"`` along the raw stochastic gradient g (SVAG).
        sign: update along sign(m~) instead of m (sign descent; no magnitude).
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
        if self.sign and self.direction != "momentum":
            raise ValueError("the sign update is defined on the momentum (M-SSD)")

    @property
    def needs_second_moment(self) -> bool:
        return self.variance_adaptation


def bias_correction(beta: float, step: int) -> float:
    """1 − β^k, the bias correction of a zero-initialised moving average (docs/algorithm.md §1)."""
    return 1.0 - beta**step


def variance_ratio(beta: float, step: int) -> float:
    """ρ(β, k) = (1−β)(1+β^k) / ((1+β)(1−β^k)), capped at :data:`RHO_CAP` (docs/algorithm.md §1).

    For i.i.d. gradients of variance σ², var[m] = ρ σ² and E[v − m²] = (1−ρ) σ².
    ``beta = 0`` gives ρ = 1 (capped) at every step.
    """
    if step < 1:
        raise ValueError(f"step counter is 1-based, got {step}")
    beta_k = beta**step
    denominator = (1.0 + beta) * (1.0 - beta_k)
    rho = (1.0 - beta) * (1.0 + beta_k) / denominator if denominator > 0 else 1.0
    return min(rho, RHO_CAP)


def _gamma_coefficients(rule: UpdateRule, beta: float, step: int):
    """Scalars that turn raw buffers into γ without materialising m, v or s.

    With bc = 1 − β^k, m = m~/bc and v = v~/bc. M-SVAG's γ = m²/(m² + ρ s) with
    s = (v − m²)/(1 − ρ), SVAG's γ = m²/(m² + s) (docs/algorithm.md §1). Both read
    γ = m² / ((1 − r) m² + r v) with r = ρ/(1−ρ) (M-SVAG) or r = 1/(1−ρ) (SVAG), i.e.

        γ = λ · m~² / (v~ + κ m~²),   λ = 1/(r bc),   κ = (1 − r)/(r bc).

    Returns (κ, upper = 1/λ): the kernels compute γ' = m~²/(v~ + κ m~²) clipped to
    [0, upper], which is γ/λ clipped to γ ∈ [0, 1].
    """
    rho = variance_ratio(beta, step)
    bc = bias_correction(beta, step)
    r = rho / (1.0 - rho) if rule.direction == "momentum" else 1.0 / (1.0 - rho)
    kappa = (1.0 - r) / (r * bc)
    upper = r * bc
    return kappa, upper


def _scaled_gamma(exp_avg: Tensor, exp_avg_sq: Tensor, kappa: float, upper: float) -> Tensor:
    """γ' = clip(m~² / (v~ + κ m~²), 0, upper), a new tensor (single-tensor form).

    The denominator gets the smallest normal number of its dtype added: where m = v = 0 the
    quotient 0/0 would be NaN, and docs/algorithm.md §1 wants γ = 0 there (no update). Any denominator
    above ~1e-31 (float32) is unchanged by that addition, so elsewhere γ is exact.
    """
    if exp_avg.dtype in _LOW_PRECISION:  # γ in float32: bf16 has 8 mantissa bits
        exp_avg, exp_avg_sq = exp_avg.float(), exp_avg_sq.float()
    numerator = exp_avg * exp_avg
    denominator = torch.add(exp_avg_sq, numerator, alpha=kappa)
    denominator.add_(torch.finfo(denominator.dtype).tiny)
    return numerator.div_(denominator).clamp_(0.0, upper)


def _scaled_gamma_foreach(
    exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor], kappa: float, upper: float
) -> List[Tensor]:
    """Multi-tensor twin of :func:`_scaled_gamma` (all tensors share one dtype)."""
    low_precision = exp_avgs[0].dtype in _LOW_PRECISION
    if low_precision:
        exp_avgs = [t.float() for t in exp_avgs]
        exp_avg_sqs = [t.float() for t in exp_avg_sqs]
    numerators = torch._foreach_mul(exp_avgs, exp_avgs)
    denominators = torch._foreach_add(exp_avg_sqs, numerators, alpha=kappa)
    torch._foreach_add_(denominators, torch.finfo(denominators[0].dtype).tiny)
    torch._foreach_div_(numerators, denominators)
    if low_precision:
        # γ ≥ 0 needs v~·bc ≥ m~² up to round-off: for k ≥ 2 the denominator exceeds
        # m~²/(r·bc) > 0, far above float32 round-off, but 16-bit state can undercut it
        torch._foreach_clamp_min_(numerators, 0.0)
    torch._foreach_clamp_max_(numerators, upper)
    return numerators


def variance_adaptation_factor(
    exp_avg: Tensor, exp_avg_sq: Tensor, *, beta: float, step: int, direction: str = "momentum"
) -> Tensor:
    """γ of the step ``step`` from the raw moving averages m~ and v~ (docs/algorithm.md §1).

    ``direction="momentum"`` gives M-SVAG's γ = m²/(m² + ρ s), ``"gradient"`` SVAG's
    γ = m²/(m² + s). γ ∈ [0, 1], and γ = 0 where m = v = 0. At k = 1, s = 0 exactly, so
    γ = 1 wherever m ≠ 0. Returned in float32 for 16-bit inputs, else in their dtype.
    """
    rule = UpdateRule(direction=direction, variance_adaptation=True)
    if step == 1:
        return (exp_avg != 0).to(torch.float32 if exp_avg.dtype in _LOW_PRECISION else exp_avg.dtype)
    kappa, upper = _gamma_coefficients(rule, beta, step)
    return _scaled_gamma(exp_avg, exp_avg_sq, kappa, upper).div_(upper)


def _update_scale(rule: UpdateRule, lr: float, beta: float, step: int) -> float:
    """The scalar in θ ← θ − scale · (γ' ·) direction, folding bias correction and λ."""
    if rule.sign:
        return lr  # M-SSD: θ ← θ − α sign(m~); the sign needs no bias correction
    scale = lr / bias_correction(beta, step) if rule.direction == "momentum" else lr
    if rule.variance_adaptation and step > 1:
        _, upper = _gamma_coefficients(rule, beta, step)
        scale /= upper  # γ = γ' / upper
    return scale


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


def _single_tensor_update(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Optional[Tensor]],
    steps: List[int],
    *,
    rule: UpdateRule,
    lr: float,
    beta: float,
    maximize: bool,
    tile_numel: Optional[int],
) -> None:
    for param, grad, exp_avg, exp_avg_sq, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        tensors = (param, grad, exp_avg, exp_avg_sq)
        chunks = _flat_chunks(tensors, tile_numel) if _can_tile(tensors, tile_numel) else [tensors]
        va_step = rule.variance_adaptation and step > 1  # at k = 1, γ = 1 exactly (docs/algorithm.md §1)
        if va_step:
            kappa, upper = _gamma_coefficients(rule, beta, step)
        scale = _update_scale(rule, lr, beta, step)
        for p, g, m, v in chunks:
            if maximize:
                g = -g
            # Moment estimator, docs/algorithm.md §1: m~ ← β m~ + (1−β) g,  v~ ← β v~ + (1−β) g²
            m.lerp_(g, 1.0 - beta)
            if v is not None:
                v.mul_(beta).addcmul_(g, g, value=1.0 - beta)
            direction = torch.sign(m) if rule.sign else (m if rule.direction == "momentum" else g)
            if va_step:
                p.addcmul_(_scaled_gamma(m, v, kappa, upper), direction, value=-scale)
            else:
                p.add_(direction, alpha=-scale)


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
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Optional[Tensor]],
    steps: List[int],
    *,
    rule: UpdateRule,
    lr: float,
    beta: float,
    maximize: bool,
    tile_numel: Optional[int],
) -> None:
    # foreach ops need one device, dtype and (for the scalars) step per call
    buckets: dict = {}
    for i, (p, step) in enumerate(zip(params, steps)):
        buckets.setdefault((p.device, p.dtype, step), []).append(i)
    for (device, _, step), indices in buckets.items():
        lists = [[lst[i] for i in indices] for lst in (params, grads, exp_avgs, exp_avg_sqs)]
        va_step = rule.variance_adaptation and step > 1  # at k = 1, γ = 1 exactly (docs/algorithm.md §1)
        if va_step:
            kappa, upper = _gamma_coefficients(rule, beta, step)
        scale = _update_scale(rule, lr, beta, step)
        if device.type != "cpu" or tile_numel is None:
            groups = [list(zip(*lists))]  # whole tensors, one foreach call per list
        else:
            groups = _tile_groups(lists, tile_numel)
        for group in groups:
            p, g, m, v = (list(t) for t in zip(*group))
            if maximize:
                g = torch._foreach_neg(g)
            # Moment estimator, docs/algorithm.md §1: m~ ← β m~ + (1−β) g,  v~ ← β v~ + (1−β) g²
            torch._foreach_lerp_(m, g, 1.0 - beta)
            if rule.needs_second_moment:
                torch._foreach_mul_(v, beta)
                torch._foreach_addcmul_(v, g, g, value=1.0 - beta)
            direction = torch._foreach_sign(m) if rule.sign else (m if rule.direction == "momentum" else g)
            if va_step:
                gammas = _scaled_gamma_foreach(m, v, kappa, upper)
                torch._foreach_addcmul_(p, gammas, direction, value=-scale)
            else:
                torch._foreach_add_(p, direction, alpha=-scale)


#: Tensors with fewer elements than this take the multi-tensor path even when fused: a
#: compiled call costs ~150 µs of Python-side guards and wrappers (measured on 2 cores),
#: which the one-pass kernel only earns back on ~10^5 elements. (At least 2: torch.compile
#: specialises sizes 0 and 1, which would mean a second graph.)
FUSED_MIN_NUMEL = 2**17

_fused_kernels: dict = {}
_fused_broken: Optional[str] = None


def _make_fused_kernel(rule: UpdateRule):
    """The whole update of one flat tensor as one elementwise function, for torch.compile.

    ``scalars`` = [gradient sign (±1 for maximize), 1−β, β, κ, upper, −scale], passed as a
    tensor so that their changing values never trigger a recompile.
    """

    def kernel(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Optional[Tensor], scalars: Tensor):
        compute = torch.float64 if param.dtype == torch.float64 else torch.float32
        g = grad.to(compute) * scalars[0]
        m = exp_avg.to(compute)
        m = m + scalars[1] * (g - m)  # m~ ← β m~ + (1−β) g
        exp_avg.copy_(m)
        direction = torch.sign(m) if rule.sign else (m if rule.direction == "momentum" else g)
        if rule.variance_adaptation:
            v = exp_avg_sq.to(compute) * scalars[2] + scalars[1] * g * g  # v~ ← β v~ + (1−β) g²
            exp_avg_sq.copy_(v)
            a = m * m
            gamma = torch.clamp(a / (v + scalars[3] * a + torch.finfo(compute).tiny), min=0.0)
            direction = torch.minimum(gamma, scalars[4]) * direction
        param.copy_(param.to(compute) + scalars[5] * direction)

    # torch.compile caches graphs per code object and caps recompiles per code object
    # (8 by default): one code object per rule keeps the rules from sharing that budget
    code = kernel.__code__.replace(
        co_name=f"fused_{rule.direction}_sign{int(rule.sign)}_va{int(rule.variance_adaptation)}"
    )
    kernel = types.FunctionType(code, kernel.__globals__, code.co_name, kernel.__defaults__, kernel.__closure__)
    return torch.compile(kernel, dynamic=True, fullgraph=True)


def _flat_alias(tensor: Tensor) -> Tensor:
    """A 1-D tensor over the same memory that is not an autograd view of ``tensor``.

    torch.compile guards on a view's base (its rank and sizes), which would compile one
    graph per parameter shape; a plain 1-D alias needs one graph per rule and dtype.
    """
    return torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(
        tensor.untyped_storage(), tensor.storage_offset(), (tensor.numel(),), (1,)
    )


@functools.lru_cache(maxsize=None)
def _compiler_toolchain_present() -> bool:
    """torch.compile supported here and a C++ compiler on PATH; fixed for the process, so
    probed once (it is consulted on every default-path ``step()``)."""
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return False
    except Exception:
        return False
    return any(shutil.which(cxx) for cxx in ("c++", "g++", "clang++", "cl"))


def fused_path_available() -> bool:
    """Whether the compiled kernel can run here: torch.compile works, a C++ compiler
    exists, and no earlier compile in this process failed."""
    return _fused_broken is None and _compiler_toolchain_present()


def _fused_update(kernel, tensors, scalars: Tensor) -> bool:
    """Run the compiled kernel on one (param, grad, m~, v~); False if it is unavailable."""
    global _fused_broken
    if _fused_broken is not None:
        return False
    try:
        kernel(*(None if t is None else _flat_alias(t) for t in tensors), scalars)
    except Exception as error:  # no C++ compiler, unsupported platform, ...
        _fused_broken = f"{type(error).__name__}: {error}"
        warnings.warn(
            f"fused optimizer path unavailable ({_fused_broken}); using the multi-tensor path",
            RuntimeWarning,
        )
        return False
    return True


def _fused_cpu_update(params, grads, exp_avgs, exp_avg_sqs, steps, *, rule, lr, beta, maximize, tile_numel):
    """CPU tensors through the compiled kernel.

    Large tensors get a call each. Small ones (below :data:`FUSED_MIN_NUMEL`) would pay
    more in per-call overhead than in arithmetic, so each (dtype, step) bucket of them is
    gathered into flat buffers (``torch.cat``), updated by one call, and scattered back
    (``torch._foreach_copy_``). What cannot go through the kernel (non-contiguous
    tensors, the exact k = 1 step of variance adaptation, a failed compile) takes the
    multi-tensor path.
    """
    kernel = _fused_kernels.get(rule)
    if kernel is None:
        kernel = _fused_kernels[rule] = _make_fused_kernel(rule)
    scalars_for: dict = {}  # one scalar tensor per (step, dtype), not per parameter

    def scalars(step: int, dtype: torch.dtype) -> Tensor:
        key = (step, dtype == torch.float64)
        if key not in scalars_for:
            kappa, upper = _gamma_coefficients(rule, beta, step) if rule.variance_adaptation else (0.0, 1.0)
            scalars_for[key] = torch.tensor(
                [-1.0 if maximize else 1.0, 1.0 - beta, beta, kappa, upper, -_update_scale(rule, lr, beta, step)],
                dtype=torch.float64 if key[1] else torch.float32,
            )
        return scalars_for[key]

    rest, small_buckets = [], {}
    for i, tensors in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        step = steps[i]
        if (rule.variance_adaptation and step == 1) or not all(  # k = 1: γ = 1 exactly
            t is None or (t.device.type == "cpu" and t.is_contiguous()) for t in tensors
        ):
            rest.append(i)
        elif tensors[0].numel() < FUSED_MIN_NUMEL:
            small_buckets.setdefault((step, tensors[0].dtype), []).append(i)
        elif not _fused_update(kernel, tensors, scalars(step, tensors[0].dtype)):
            rest.append(i)
    for (step, dtype), indices in small_buckets.items():
        lists = [[lst[i] for i in indices] for lst in (params, grads, exp_avgs, exp_avg_sqs)]
        if sum(p.numel() for p in lists[0]) < 2:  # a size-1 flat would need its own graph
            rest.extend(indices)
            continue
        flats = [None if lst[0] is None else torch.cat([t.view(-1) for t in lst]) for lst in lists]
        if not _fused_update(kernel, flats, scalars(step, dtype)):
            rest.extend(indices)
            continue
        sizes = [p.numel() for p in lists[0]]
        for lst, flat in zip(lists, flats):  # θ, m~, v~ back into place (not g)
            if flat is not None and lst is not lists[1]:
                torch._foreach_copy_([t.view(-1) for t in lst], list(flat.split(sizes)))
    if rest:
        _multi_tensor_update(
            *([lst[i] for i in rest] for lst in (params, grads, exp_avgs, exp_avg_sqs, steps)),
            rule=rule, lr=lr, beta=beta, maximize=maximize, tile_numel=tile_numel,
        )


def dissected_adam(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
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
    ``exp_avg_sqs`` holds ``None`` entries for rules without variance adaptation.
    ``tile_numel`` sets the CPU tile size; ``None`` processes whole tensors (as on CUDA).
    ``fused`` sends large CPU tensors through the compiled kernel (see module docstring).
    """
    if not params:
        return
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"invalid learning rate {lr}")
    if fused:
        update = _fused_cpu_update
    else:
        update = _multi_tensor_update if foreach else _single_tensor_update
    update(
        params, grads, exp_avgs, exp_avg_sqs, steps,
        rule=rule, lr=lr, beta=beta, maximize=maximize, tile_numel=tile_numel,
    )
