"""A self-check of the mini-batch variance estimate on a user's model (docs/algorithm.md §1.1).

The estimate's rules (:mod:`lightning_msvag.per_example`) are exact under a contract they cannot
see from the layers alone: example k is row k of dim 0 of every layer's input, and no layer
mixes the examples of a batch. A model that breaks it — inputs laid out time-major
(``[T, B, …]``), a parameter-free layer that normalises or centres over the batch
(``F.batch_norm(h, None, None, training=True)``, ``h - h.mean(0)``), a parameter used in the loss
outside the model — gives a wrong σ̂² with no error from the estimator.

:func:`check_batch_variance` finds out on one real batch: it forms the estimate from one
backward pass as training does, and compares it with the brute-force estimate from each
example's own gradient (one backward pass per example through the same forward pass, so that
dropout draws the same mask), and raises :class:`~lightning_msvag.batch_variance.BatchVarianceError`
with the largest relative error and the parameter it occurred in. Run it first on a new model::

    from lightning_msvag.batch_variance_check import check_batch_variance
    x, y = next(iter(loader))
    check_batch_variance(model, lambda: F.cross_entropy(model(x[:16]), y[:16], reduction="none"))

It leaves the model, its gradients and the random number generators as they were.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn

from . import batch_estimate
from .batch_variance import BatchVarianceError, BatchVarianceEstimator

__all__ = ["check_batch_variance", "DEFAULT_TOLERANCE"]

#: Largest relative error accepted by default, by the dtype the estimate is formed in: round-off
#: of Σ∇ℓ² − Bḡ² against brute force stays far below; a broken contract gives percents.
DEFAULT_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-3}


def check_batch_variance(
    model: nn.Module,
    per_example_losses: Callable[[], Tensor],
    *,
    loss_reduction: str = "mean",
    tolerance: Optional[float] = None,
) -> Dict[str, float]:
    """Compare the mini-batch estimate with brute-force per-example gradients on one batch.

    Args:
        model: the model, in the mode it trains in (``model.train()``).
        per_example_losses: runs the model's forward pass on a batch of B examples (8–64 are
            enough; the brute force costs B backward passes) and returns the B per-example
            losses ℓ_k as a 1-d tensor, e.g.
            ``lambda: F.cross_entropy(model(x), y, reduction="none")``.
        loss_reduction: how training reduces them (``"mean"``, ``"sum"``): the estimate describes
            that loss's gradient.
        tolerance: the largest relative error accepted per parameter, ``max |σ̂² − σ̂²_brute|``
            over the larger of ``max σ̂²`` and ``max σ̂²_brute`` (at most 1; default
            :data:`DEFAULT_TOLERANCE` of the estimate's dtype).

    Returns:
        ``{parameter name: relative error}`` when every parameter is within ``tolerance``.

    Raises:
        BatchVarianceError: an error above ``tolerance`` (naming the worst parameter), layers that
            see another number of rows than the loss has examples, or anything the estimator
            refuses.
    """
    estimator = BatchVarianceEstimator(model, loss_reduction=loss_reduction, sync_distributed=False)
    params = list(estimator.parameters())
    names = {id(p): estimator._name(p) for p in params}
    saved_grads = [p.grad for p in params]
    devices = sorted({p.device.index for p in params if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            for p in params:
                p.grad = None
            with estimator.record():
                losses = per_example_losses()
                if not isinstance(losses, Tensor) or losses.dim() != 1:
                    raise BatchVarianceError(
                        "per_example_losses must return the per-example losses as a 1-d tensor (reduction='none'), "
                        f"got {type(losses).__name__}{'' if not isinstance(losses, Tensor) else ' of shape ' + str(tuple(losses.shape))}"
                    )
                total = losses.mean() if loss_reduction == "mean" else losses.sum()
                total.backward(retain_graph=True)
            estimate = estimator.compute()
            if estimator.batch_size != losses.numel():
                raise BatchVarianceError(
                    f"the layers see {estimator.batch_size} rows in dim 0, the loss has {losses.numel()} examples: "
                    "example k must be row k of dim 0 of every layer's input (time-major input?)"
                )
            brute = _brute_force(losses, params, loss_reduction)
    finally:
        for p, grad in zip(params, saved_grads):
            p.grad = grad
            batch_estimate.clear(p)
        estimator.close()
    errors: Dict[str, float] = {}
    dtype = torch.float32
    for p in params:
        truth = brute[id(p)]
        got = estimate.get(p)
        got = torch.zeros_like(truth) if got is None else got.to(truth.dtype)
        # relative to the larger of the two: an estimate where the truth is 0 is 100 % off, not ∞
        scale = max(float(truth.abs().max()), float(got.abs().max())) if truth.numel() else 0.0
        gap = float((got - truth).abs().max()) if truth.numel() else 0.0
        errors[names[id(p)]] = gap / scale if scale > 0 else 0.0
        if p.dtype == torch.float64:
            dtype = torch.float64
    limit = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
    worst = max(errors, key=errors.get) if errors else None
    if worst is not None and errors[worst] > limit:
        raise BatchVarianceError(
            f"the mini-batch variance estimate differs from brute-force per-example gradients by {errors[worst]:.1%} "
            f"(relative, parameter {worst!r}; tolerance {limit:.0e}): the model breaks the estimate's contract "
            "(examples in dim 0 of every layer, no layer that mixes a batch's examples, no use of a parameter "
            "outside its layers); train it with the moving-average estimate"
        )
    return errors


def _brute_force(losses: Tensor, params, loss_reduction: str) -> Dict[int, Tensor]:
    """σ̂² of the batch gradient from each example's own gradient, written out directly (float64)."""
    batch = losses.numel()
    per_example = [[] for _ in params]
    for k in range(batch):
        grads = torch.autograd.grad(losses[k], params, retain_graph=k < batch - 1, allow_unused=True)
        for store, p, g in zip(per_example, params, grads):
            store.append(torch.zeros_like(p, dtype=torch.float64) if g is None else g.to(torch.float64))
    out = {}
    for p, store in zip(params, per_example):
        g = torch.stack(store)
        one_example = g.var(0, unbiased=True)  # the sample variance of one example's gradient
        # the optimizer receives the mean (variance σ²/B) or the sum (variance B σ²) of the gradients
        out[id(p)] = one_example / batch if loss_reduction == "mean" else one_example * batch
    return out
