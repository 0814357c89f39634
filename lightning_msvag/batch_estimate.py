"""The hand-over of a mini-batch variance estimate from the estimator to the optimizer (docs/algorithm.md §1.1).

:class:`~lightning_msvag.batch_variance.BatchVarianceEstimator` leaves on every parameter ``p``
it tracks, after the backward pass (:func:`attach`):

* ``p.grad_batch_variance``: σ̂², the variance of ``p.grad`` *as it is at that moment*;
* a private reference to that gradient: the tensor, its version counter and a copy.

A variance-adapted optimizer with ``variance="minibatch"`` calls :func:`take` for every
parameter it is about to step, before it changes anything, and :func:`consume` after the step.
:func:`take` returns the σ̂² that describes the gradient the step will use:

* the gradient is the one of the estimate (the same tensor at the same version: no pass over
  memory; or the same values) → σ̂² as it is;
* the gradient was rescaled uniformly since, ``g = c · g₀`` (clipping by norm, over all
  parameters or per tensor) → ``c² · σ̂²``, since var[c g₀] = c² var[g₀];
* anything else (clipping by value, a hook that edited the gradient, a new backward pass
  without a new estimate) → ``RuntimeError`` naming the parameter;
* no estimate (none recorded, or already used by a step: one estimate, one step) →
  ``RuntimeError``.

A σ̂² set by hand (``p.grad_batch_variance = tensor``, without the estimator) carries no
reference: it is taken as it is, once.

This module needs only torch: the estimator and the optimizers both import it.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["VARIANCE_ATTRIBUTE", "attach", "clear", "consume", "take"]

#: The public attribute that holds σ̂² on each parameter.
VARIANCE_ATTRIBUTE = "grad_batch_variance"
_REFERENCE_ATTRIBUTE = "_grad_batch_reference"

_HOW_TO_RECORD = (
    "record the backward pass with lightning_msvag.batch_variance.BatchVarianceEstimator "
    "(est.record(), est.compute()) or add BatchVarianceCallback"
)


class _Reference(NamedTuple):
    """The gradient σ̂² was formed for: the tensor (weakly), its version counter then, a copy, the parameter's name."""

    grad: "weakref.ref[Tensor]"
    version: int
    copy: Tensor
    name: str


def attach(p: Tensor, variance: Tensor, grad: Optional[Tensor], name: str, buffer: Optional[Tensor] = None) -> None:
    """Leave σ̂² (``variance``) on ``p`` for the gradient ``grad`` (``p.grad`` now; ``None`` if it has
    none). The reference copy of ``grad`` goes into ``buffer`` where it fits (a buffer the caller
    reuses step after step: no allocation), else into a new tensor."""
    setattr(p, VARIANCE_ATTRIBUTE, variance)
    reference = None
    if grad is not None:
        fits = buffer is not None and (buffer.shape, buffer.dtype, buffer.device) == (grad.shape, grad.dtype, grad.device)
        copy = buffer.copy_(grad) if fits else grad.detach().clone()
        reference = _Reference(weakref.ref(grad), grad._version, copy, name)
    setattr(p, _REFERENCE_ATTRIBUTE, reference)


def clear(p: Tensor) -> None:
    """Remove ``p``'s estimate (no step may use it). Attributes are only set, never added: a
    compiled step guards on which exist, and the same ones exist step after step."""
    setattr(p, VARIANCE_ATTRIBUTE, None)
    if hasattr(p, _REFERENCE_ATTRIBUTE):
        setattr(p, _REFERENCE_ATTRIBUTE, None)


def consume(params) -> None:
    """After a step: the estimates of ``params`` are used up (one estimate, one step)."""
    for p in params:
        clear(p)


def take(p: Tensor, who: str, where: str) -> Tensor:
    """σ̂² of the gradient ``p`` will be stepped with (see the module docstring); reads, never writes.

    ``who`` names the optimizer, ``where`` the parameter when the estimator did not
    (``"parameter 3 of group 0"``), in errors.
    """
    variance = getattr(p, VARIANCE_ATTRIBUTE, None)
    if variance is None:
        raise RuntimeError(
            f"{who} needs the mini-batch variance estimate for this step: {where} has none (none was recorded, "
            f"or a step already used it: one estimate, one step); {_HOW_TO_RECORD}"
        )
    if variance.shape != p.shape:
        raise RuntimeError(
            f"{who} needs the mini-batch variance estimate for this step: {where} has one of shape "
            f"{tuple(variance.shape)}, not {tuple(p.shape)}"
        )
    reference: Optional[_Reference] = getattr(p, _REFERENCE_ATTRIBUTE, None)
    grad = p.grad
    if reference is None:
        return variance
    if torch.compiler.is_compiling():
        return variance * _checked_scale_in_graph(grad, reference.copy, reference.name or where) ** 2
    if grad is reference.grad() and grad._version == reference.version:
        return variance
    scale = _uniform_scale(grad, reference.copy)
    if scale == 1.0:
        return variance
    if scale is None:
        raise RuntimeError(
            f"the gradient of {reference.name or where} changed between the mini-batch variance estimate and step() "
            "by something other than a uniform rescale (clipping by value, a hook that edits gradients, or a new "
            "backward pass without a new estimate): the estimate does not describe it. Clip by norm, or "
            "form the estimate after the change"
        )
    return variance * (scale * scale)


def _checked_scale_in_graph(grad: Tensor, original: Tensor, name: str) -> Tensor:
    """:func:`_uniform_scale` as tensor operations, for ``torch.compile`` (a 0-dim tensor c; no host
    read: the refusal is ``torch._assert_async``, raised when the step runs)."""
    low, high = torch.aminmax(original)
    grad_low, grad_high = torch.aminmax(grad)
    top = high.abs() >= low.abs()
    largest, now = torch.where(top, high, low), torch.where(top, grad_high, grad_low)
    scale = torch.where(largest == 0, torch.ones_like(largest), now / torch.where(largest == 0, torch.ones_like(largest), largest))
    bound = 4 * torch.finfo(grad.dtype).eps * scale * largest.abs()
    below, above = torch.aminmax(grad - original * scale)
    torch._assert_async(
        (scale >= 0) & (torch.maximum(-below, above) <= bound),
        f"the gradient of {name} changed between the mini-batch variance estimate and step() by something other "
        "than a uniform rescale: the estimate does not describe it (docs/algorithm.md §1.1)",
    )
    return scale


def _uniform_scale(grad: Tensor, original: Tensor) -> Optional[float]:
    """``c ≥ 0`` with ``grad == c · original`` to rounding, else ``None`` (four passes over memory).

    Rounding is monotonic, so a rescale by ``c ≥ 0`` keeps the extreme entries extreme: ``c`` is
    read off the entry of ``original`` largest in magnitude (one division, exact to rounding
    where a ratio of norms would carry the reductions' error). Then no entry may differ from
    ``c · original`` by more than a few units of rounding of that largest entry, so a single
    clipped entry (clipping by value changes the largest ones) or an added term is found.
    """
    if grad.shape != original.shape or grad.dtype != original.dtype or not grad.dtype.is_floating_point:
        return None
    if original.numel() == 0:
        return 1.0
    low, high = (float(v) for v in torch.aminmax(original))
    grad_low, grad_high = (float(v) for v in torch.aminmax(grad))
    largest, now = (high, grad_high) if abs(high) >= abs(low) else (low, grad_low)
    if largest == 0.0:  # an all-zero gradient stays all-zero under any rescale
        return 1.0 if grad_low == grad_high == 0.0 else None
    scale = now / largest
    if not scale >= 0.0:
        return None
    # clip_grad_norm_ writes fl(c · g₀): within half an ulp of c · max|g₀| of c · g₀ everywhere
    bound = 4 * torch.finfo(grad.dtype).eps * scale * abs(largest)
    below, above = (float(v) for v in torch.aminmax(torch.sub(grad, original, alpha=scale)))
    return scale if max(-below, above) <= bound else None
