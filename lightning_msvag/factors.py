"""Reading variance-adaptation factors γ out of an optimizer's public state (no Lightning).

One walk over ``param_groups`` / ``state`` for everything that needs γ: the optimizers'
own ``variance_adaptation_factors()`` (:mod:`lightning_msvag.optimizers`) and the
:class:`~lightning_msvag.callbacks.VarianceAdaptationMonitor`. Each reader yields one
:class:`Factor` per parameter that has taken at least one step, lazily (one γ tensor alive
at a time), and never changes the optimizer.

A factor ties γ to the estimated relative variance η̂² through γ = (1 + λ η̂²)^(−1/power)
(docs/algorithm.md §1):

* M-SVAG: γ = 1/(1 + ρ η̂²) — λ = ρ(β, k), power 1;
* SVAG: γ = 1/(1 + η̂²) — λ = 1, power 1;
* Adam / AdamW: the implicit factor (1 + η̂²)^(−1/2) = |m|/√v, bias-corrected with β1 and
  β2, clipped at 1 (with β1 ≠ β2, m² can exceed v), 0 where m = v = 0 — λ = 1, power 2.
  ε and ``amsgrad``'s running maximum are ignored: the paper's factor, not the exact step;
* M-SGD / M-SSD with a :class:`MomentTracker`: the γ M-SVAG would apply to the same
  gradients, from the optimizer's m~ and the tracker's v~.

Complex parameters are stepped as (real, imaginary) pairs (``torch.view_as_real``, as
torch's optimizers do), so their γ is that of the real view: shape ``p.shape + (2,)``,
real dtype (``γ[..., 0]`` for the real parts, ``γ[..., 1]`` for the imaginary parts).
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, List, Mapping, NamedTuple, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from .functional import rule_variance_factor, variance_adaptation_factor
from .rule import UpdateRule, bias_correction, variance_ratio

__all__ = [
    "Factor", "MomentTracker", "UnreadableOptimizer", "read_factors", "dissected_factors", "adam_factors",
    "is_untracked_dissected", "dissected_sign_factors",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class Factor(NamedTuple):
    """γ of one parameter, and how it maps to η̂²: γ = (1 + lam · η̂²)^(−1/power)."""

    param: Tensor
    gamma: Tensor
    lam: float
    power: int


class UnreadableOptimizer(ValueError):
    """``read_factors`` cannot get γ from this optimizer; ``key`` identifies the reason (warn once per key)."""

    def __init__(self, message: str, key) -> None:
        super().__init__(message)
        self.key = key


class MomentTracker:
    """v~ for optimizers that keep none (M-SGD, M-SSD): one buffer per parameter, its own step count.

    ``update(optimizer)`` must run once per optimizer step, with the gradients the step will
    use (the monitor calls it in ``on_before_optimizer_step``). ``state_dict(names)`` /
    ``load_state_dict(state, params)`` carry v~ and the counts across a checkpoint, keyed by
    parameter name (the monitor's callback state), so a resumed run tracks the same γ as an
    uninterrupted one. A tracker started without that state (a fresh fit, or a resume from
    a checkpoint written without it) starts v~ at zero, and :func:`dissected_factors`
    bias-corrects it with its own count (re-weighted to the optimizer's step k).
    """

    def __init__(self) -> None:
        #: param -> [v~, steps seen]
        self.buffers: Dict[Tensor, List] = {}

    def __len__(self) -> int:
        return len(self.buffers)

    @torch.no_grad()
    def update(self, optimizer: Optimizer) -> None:
        for group in optimizer.param_groups:
            beta = group["beta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                entry = self.buffers.get(p)
                if entry is None:
                    entry = self.buffers[p] = [torch.zeros_like(p, memory_format=torch.preserve_format), 0]
                v, g = entry[0], p.grad
                if v.is_complex():  # per real coordinate, as the optimizers' own v~
                    v, g = torch.view_as_real(v), torch.view_as_real(g.resolve_conj())
                v.mul_(beta).addcmul_(g, g, value=1.0 - beta)
                entry[1] += 1

    def state_dict(self, names: Mapping[Tensor, str]) -> Dict[str, Dict[str, object]]:
        """``{name: {"v": v~, "steps": count}}`` for every tracked parameter named in ``names``
        (tensors and ints only: a checkpoint loads with ``torch.load(weights_only=True)``)."""
        return {names[p]: {"v": v, "steps": int(count)} for p, (v, count) in self.buffers.items() if p in names}

    def load_state_dict(self, state: Mapping[str, Mapping[str, object]], params: Mapping[str, Tensor]) -> None:
        """Replace the buffers by ``state`` (from :meth:`state_dict`), matched to ``params`` by name."""
        buffers: Dict[Tensor, List] = {}
        for name, entry in state.items():
            p = params.get(name)
            v = entry["v"]
            if p is None or tuple(v.shape) != tuple(p.shape):
                raise ValueError(
                    f"the checkpoint's tracked second moment of {name!r} does not fit the model "
                    f"({'no such parameter' if p is None else f'shape {tuple(v.shape)} vs {tuple(p.shape)}'})"
                )
            buffers[p] = [v.to(device=p.device, dtype=p.dtype, copy=True), int(entry["steps"])]
        self.buffers = buffers

    def second_moment(self, p: Tensor, beta: float, step: int) -> Optional[Tensor]:
        """v~ of ``p`` weighted as if it had been averaged over ``step`` steps; ``None`` if never updated."""
        entry = self.buffers.get(p)
        if entry is None or entry[1] == 0:
            return None
        v, count = entry
        if count != step:  # started later (a resume): bias-correct with its own count, expressed at k
            v = v * (bias_correction(beta, step) / bias_correction(beta, count))
        return v


def _steps(optimizer: Optimizer, p: Tensor, to_int) -> Optional[tuple]:
    state = optimizer.state.get(p)
    if not state or "exp_avg" not in state:
        return None
    k = to_int(state["step"])
    return (state, k) if k > 0 else None


def dissected_factors(optimizer: Optimizer, tracker: Optional[MomentTracker] = None) -> Iterator[Factor]:
    """γ of a :class:`~lightning_msvag.DissectedOptimizer`, in ``param_groups`` order.

    M-SVAG / SVAG: from their m~, v~ and step (each group with its own ``variance``). M-SGD / M-SSD:
    the M-SVAG γ from m~ and ``tracker``'s v~ (parameters the tracker has not seen are skipped).
    """
    adapted = optimizer.rule.variance_adaptation
    direction = optimizer.rule.direction if adapted else "momentum"
    if not adapted and tracker is None:
        return
    for p, rule, beta, state, k in _stepped(optimizer):
        v = state["exp_avg_sq"] if adapted else tracker.second_moment(p, beta, k)
        if v is None:
            continue
        if adapted and rule.needs_batch_variance:  # v~ is the mini-batch buffer (§1.1)
            gamma = rule_variance_factor(rule, state["exp_avg"], v, beta=beta, step=k)
        else:
            gamma = variance_adaptation_factor(state["exp_avg"], v, beta=beta, step=k, direction=direction)
        lam = variance_ratio(beta, k) if direction == "momentum" else 1.0
        yield Factor(p, gamma, lam, 1)


def _stepped(optimizer: Optimizer) -> Iterator[tuple]:
    """(parameter, its group's rule, its group's β, its state, its step k) of every parameter that has stepped."""
    for group in optimizer.param_groups:
        rule = optimizer.rule_of(group)
        for p in group["params"]:
            found = _steps(optimizer, p, lambda s: int(s.item()))
            if found is not None:
                yield (p, rule, group["beta"], *found)


def dissected_sign_factors(optimizer: Optimizer) -> Iterator[Factor]:
    """γ^s of a sign + variance-adaptation optimizer (M-SSD-VA, docs/algorithm.md §1.2), in
    ``param_groups`` order: the factor its step applied to the sign. ``"sqrt"``: γ^s =
    (1 + ρ η̂²)^(−1/2), λ = ρ, power 2; ``"erf"`` has no such form (λ, power of the γ it is
    computed from, M-SVAG's: ρ, 1). Each group with its own ``factor`` and ``variance``."""
    for p, rule, beta, state, k in _stepped(optimizer):
        gamma = rule_variance_factor(rule, state["exp_avg"], state["exp_avg_sq"], beta=beta, step=k, sign_factor=True)
        lam = variance_ratio(beta, k) if rule.direction == "momentum" else 1.0
        yield Factor(p, gamma, lam, 2 if rule.sign_factor == "sqrt" else 1)


def adam_factors(optimizer: Optimizer) -> Iterator[Factor]:
    """Adam's implicit factor (1 + η̂²)^(−1/2) = |m|/√v per parameter (``torch.optim.Adam`` / ``AdamW`` state)."""
    for group in optimizer.param_groups:
        beta1, beta2 = (float(b) for b in group["betas"])
        for p in group["params"]:
            found = _steps(optimizer, p, lambda s: int(float(s)))
            if found is None:
                continue
            state, k = found
            m, v = state["exp_avg"], state["exp_avg_sq"]
            if m.is_complex():  # torch's Adam steps complex parameters on the real view
                m, v = torch.view_as_real(m), torch.view_as_real(v)
            if m.dtype in _LOW_PRECISION or m.dtype != v.dtype:
                m, v = m.float(), v.float()
            # (1 + η̂²)^(-1/2) = |m| / sqrt(max(v, m²)) with m = m~/bc1, v = v~/bc2; 0 where m = v = 0
            scale = math.sqrt(bias_correction(beta2, k)) / bias_correction(beta1, k)
            factor = m.abs().mul_(scale).div_(v.sqrt()).clamp_(max=1.0).nan_to_num_(nan=0.0)
            yield Factor(p, factor, 1.0, 2)


def read_factors(optimizer: Optimizer, tracker: Optional[MomentTracker] = None) -> Iterator[Factor]:
    """The :class:`Factor` iterator for any supported optimizer; raises :class:`UnreadableOptimizer` otherwise.

    Supported: MSVAG, SVAG, ``torch.optim.Adam`` / ``AdamW``, and MSGD / MSSD when a
    ``tracker`` is given. Raises before anything is read, so callers can warn and skip.
    """
    name = type(optimizer).__name__
    if _is_dissected(optimizer):
        if not optimizer.rule.variance_adaptation and tracker is None:
            raise UnreadableOptimizer(
                f"{name} keeps no second moment; pass track_moments=True to log the γ M-SVAG would apply "
                "(one extra buffer per parameter).",
                ("untracked", type(optimizer)),
            )
        return dissected_factors(optimizer, tracker)
    if isinstance(optimizer, torch.optim.Adam) or name == "AdamW":
        return adam_factors(optimizer)
    raise UnreadableOptimizer(
        f"cannot read a variance-adaptation factor from {name}; it is skipped "
        "(supported: MSVAG, SVAG, Adam/AdamW, and MSGD/MSSD with track_moments=True).",
        ("unreadable", type(optimizer)),
    )


def is_untracked_dissected(optimizer: Optimizer) -> bool:
    """An M-SGD / M-SSD: γ needs a :class:`MomentTracker`."""
    return _is_dissected(optimizer) and not optimizer.rule.variance_adaptation


def _is_dissected(optimizer: Optimizer) -> bool:
    """A :class:`~lightning_msvag.DissectedOptimizer`, known by its :class:`~lightning_msvag.rule.UpdateRule`
    (not by ``isinstance``: :mod:`lightning_msvag.optimizers` imports this module, not the reverse)."""
    return isinstance(getattr(optimizer, "rule", None), UpdateRule)
