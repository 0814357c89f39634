"""The paper's optimizers as ``torch.optim.Optimizer`` subclasses (docs/algorithm.md §1).

All four share :class:`DissectedOptimizer`; each subclass only fixes the two switches of
:class:`~lightning_msvag.rule.UpdateRule` (sign, variance adaptation) and SVAG's
direction. Adam is ``torch.optim.Adam`` (see :mod:`lightning_msvag.registry`).

State per parameter (names as in ``torch.optim.Adam`` so tools that read Adam's state read
ours): ``step`` (a float32 CPU scalar tensor, 1-based count of steps taken), ``exp_avg``
(m~, the un-corrected moving average of g) and, with variance adaptation, ``exp_avg_sq``
(v~, the moving average of g²). Buffers have the parameter's dtype and device.

Non-finite gradients: like ``torch.optim``, the optimizers do not inspect gradients by
default (a check costs one more pass over them and, on CUDA, a device synchronisation).
A NaN or ±inf gradient entry enters m~ (and v~) and stays there; the parameter at that
coordinate becomes NaN on that step for M-SGD, M-SVAG and SVAG. M-SSD's parameters stay
finite (``torch.sign`` maps NaN to 0 and ±inf to ±1), so its broken moving average shows
nowhere else: the coordinate stops moving (NaN) or keeps moving by α (inf). Two ways to notice:
``error_if_nonfinite=True`` checks all gradients before touching any state and raises a
``RuntimeError`` (state and parameters unchanged), and :meth:`DissectedOptimizer.nonfinite_state`
lists the parameters whose buffers hold non-finite values.

What carries over from ``torch.optim`` (docs/algorithm.md §4 lists what deliberately does
not): a ``step`` loaded as a number or an integer tensor (old checkpoints) is converted
to the float32 tensor; complex parameters are stepped as (real, imaginary) pairs; ``lr``
may be a 1-element tensor (schedulers that write tensors); a step that raises leaves
the optimizer unchanged (everything is checked before any state is created or counter
advanced); with ``fused=True`` the optimizer joins the GradScaler protocol of torch's
fused optimizers (``_step_supports_amp_scaling``: the gradients are unscaled inside the
update and a step with ``found_inf`` is skipped).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import functional as F
from .factors import dissected_factors, dissected_sign_factors
from .functional import CPU_TILE_NUMEL, fused_path_available
from .rule import UpdateRule

__all__ = ["DissectedOptimizer", "MSGD", "MSSD", "MSVAG", "SVAG", "SSD", "MSSDVA"]


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
        device_types = ("cpu",) if all(map(F._IS_CPU, params)) else {p.device.type for p in params}
        fused = F._fused_unsupported(params) is None and all(map(fused_path_available, device_types))
        if not fused and "cuda" in device_types and not fused_path_available("cuda"):
            F._warn_no_device_kernel()
    if foreach is None:
        foreach = not fused and not torch.jit.is_scripting()
    return bool(foreach), bool(fused)


class DissectedOptimizer(Optimizer):
    """Base class: one moment estimator, an optional sign, an optional variance adaptation.

    Subclasses set :attr:`rule`. Args common to all:

    Args:
        params: iterable of parameters or of param-group dicts.
        lr: step size α ≥ 0.
        beta: the one moving-average constant β ∈ [0, 1) used for m~ and v~ (paper: 0.9).
        maximize: ascend instead of descend (the gradient is negated).
        foreach: ``True`` multi-tensor path, ``False`` single-tensor path, ``None`` the
            faster one for the parameters' device (see ``fused``). All paths compute the
            same numbers (to float round-off).
        fused: the fused CPU kernel: one generated C++ call per param group runs the whole
            update of every tensor in one pass over memory (read g, θ, m~, v~; write θ,
            m~, v~; no temporaries), parallel over all elements, like torch's fused Adam
            (:mod:`lightning_msvag._cpu_kernel`). ``None`` (default) uses it on CPU for
            every rule unless ``foreach`` is set; other devices (CUDA) take the
            multi-tensor path. ``True`` with parameters on other devices raises
            ``RuntimeError`` in ``step()`` (torch's fused optimizers' error; there is no
            fused CUDA kernel yet; no silent fallback). ``True`` also joins the AMP
            protocol of torch's fused optimizers: a ``torch.amp.GradScaler`` leaves the
            gradients scaled and the step unscales them (and skips itself on inf). ``False`` never. The
            kernel is compiled with the system C++ compiler once per machine and version
            (about 1-3 s, announced in one line, cached on disk under
            ``~/.cache/lightning_msvag`` or ``$LIGHTNING_MSVAG_CACHE``, file-locked for
            concurrent DDP ranks); later processes only load it. Without a compiler, or
            if the build fails, one warning is raised and the multi-tensor path is used.
        error_if_nonfinite: check the gradients before each step and raise
            ``RuntimeError`` on NaN/inf, leaving parameters and state untouched.
    """

    rule: UpdateRule = UpdateRule()
    #: CPU tile size of the functional core (an implementation detail, not a hyperparameter:
    #: it changes speed, not results). ``None`` processes whole tensors.
    _tile_numel: Optional[int] = CPU_TILE_NUMEL

    def __init__(
        self,
        params: Iterable,
        lr: "float | Tensor" = 1e-3,
        beta: float = 0.9,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        error_if_nonfinite: bool = False,
    ) -> None:
        _check_hyperparameters(type(self).__name__, lr, beta)
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")  # torch's wording
        if fused:
            # torch's fused-optimizer AMP protocol (torch.amp.GradScaler.step): the scaler sets
            # grad_scale / found_inf on the optimizer instead of unscaling the gradients itself.
            # Only for an explicit fused=True, as torch: with it Lightning refuses gradient
            # clipping, and hooks between backward and step see scaled gradients
            # (docs/algorithm.md §4). step() handles both on every path it may take.
            self._step_supports_amp_scaling = True
        defaults = dict(
            lr=lr,
            beta=beta,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            error_if_nonfinite=error_if_nonfinite,
        )
        #: id(group) -> ids of its step tensors, while they are known to agree (see _read_steps)
        self._uniform_steps: Dict[int, List[int]] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Validate ``lr`` and ``beta`` (the group's, else the defaults) *before* adding the group:
        a rejected group raises ``ValueError`` and leaves the optimizer unchanged."""
        if isinstance(param_group, dict):
            defaults = getattr(self, "defaults", {})
            _check_hyperparameters(
                type(self).__name__, param_group.get("lr", defaults.get("lr")), param_group.get("beta", defaults.get("beta"))
            )
        super().add_param_group(param_group)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._uniform_steps = {}  # the state may have changed: read every counter once
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("error_if_nonfinite", False)
            for p in group["params"]:
                p_state = self.state.get(p)
                if p_state and "step" in p_state:
                    p_state["step"] = _step_tensor(p_state["step"])

    def _checked_groups(self) -> List[tuple]:
        """Every group's (group, params, grads, foreach, fused), after checking everything a step
        can refuse: hyperparameters, sparse gradients, the path's requirements. Nothing is
        changed here, so a refused step leaves the optimizer as it was."""
        name = type(self).__name__
        checked = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):
                raise RuntimeError(f"{name} does not support sparse gradients")
            _check_hyperparameters(name, group["lr"], group["beta"])
            if group["fused"] and group["foreach"]:
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
            foreach, fused = _default_paths(params, group["foreach"], group["fused"], self.rule)
            F._check_step_inputs(params, grads, lr=group["lr"], foreach=foreach, fused=fused)
            checked.append((group, params, grads, foreach, fused))
        return checked

    def _init_state(self, params: List[Tensor]):
        """The buffers and step tensors of ``params``, created (zeros, step 0) where missing;
        also whether any was created."""
        exp_avgs, exp_avg_sqs, step_tensors = [], [], []
        created = False
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                created = True
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                # complex parameters: complex buffers, stepped through their real views
                if self.rule.needs_first_moment:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if self.rule.needs_second_moment:
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state.get("exp_avg"))
            exp_avg_sqs.append(state.get("exp_avg_sq"))
            step_tensors.append(state["step"])
        return exp_avgs, exp_avg_sqs, step_tensors, created

    def _device_steps(self, params: List[Tensor], step_tensors: List[Tensor]) -> List[Tensor]:
        """The step counters of ``params`` on the parameters' devices (moved there once, as
        torch's fused Adam keeps them): the device kernel reads each tensor's k itself."""
        moved = list(step_tensors)
        for i, (p, s) in enumerate(zip(params, step_tensors)):
            if s.device != p.device:
                moved[i] = self.state[p]["step"] = s.to(device=p.device, dtype=torch.float32)
        return moved

    def _read_steps(self, index: int, step_tensors: List[Tensor], created: bool) -> List[int]:
        """The (already advanced) step counters of a group as ints.

        Reading a 0-dim tensor costs ~0.3 µs; 2,000 of them add up (issue 17). When the
        same step tensors as last step were advanced together (none created since, none
        replaced: compared by identity; ``load_state_dict`` forgets what is known) and they
        agreed then, they still agree: read the first (and the last). Otherwise read each,
        and remember whether they agree.
        """
        ids = list(map(id, step_tensors))
        known = self._uniform_steps.get(index)
        if not created and known is not None and known == ids:
            k = int(step_tensors[0])
            if int(step_tensors[-1]) == k:  # a cheap guard against a hand-edited counter
                return [k] * len(step_tensors)
        steps = [int(s) for s in step_tensors]
        if steps.count(steps[0]) == len(steps):
            self._uniform_steps[index] = ids
        else:
            self._uniform_steps.pop(index, None)
        return steps

    def _check_finite(self, gradients: List[Tuple[int, int, Tensor]]) -> None:
        if not gradients:
            return
        finite = torch.stack([torch.isfinite(g).all().cpu() for _, _, g in gradients])
        if bool(finite.all()):
            return
        bad = [(gi, pi) for (gi, pi, _), ok in zip(gradients, finite.tolist()) if not ok]
        raise RuntimeError(
            f"{type(self).__name__}: non-finite gradient in (param group, index) {bad}; "
            "the step was not taken, parameters and optimizer state are unchanged"
        )

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Perform one step. ``closure`` re-evaluates the model and returns the loss.

        Everything that can be refused is refused before any state is created or any
        counter advanced (a step that raises is a no-op). Under a ``torch.amp.GradScaler``
        with ``fused=True`` (see the class): the gradients are divided by the scaler's
        ``grad_scale`` inside the update, and a nonzero ``found_inf`` skips the step
        entirely (state, counters and parameters unchanged).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        checked = self._checked_groups()
        # error_if_nonfinite: look at every gradient before any state changes
        self._check_finite(
            [
                (gi, pi, p.grad)
                for gi, group in enumerate(self.param_groups)
                if group["error_if_nonfinite"]
                for pi, p in enumerate(group["params"])
                if p.grad is not None
            ]
        )
        # set by GradScaler.step for optimizers with _step_supports_amp_scaling, deleted after
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        skip_read: List[bool] = []  # found_inf read on the host once, only where a host path needs it

        def skipped() -> bool:
            if not skip_read:
                skip_read.append(found_inf is not None and F._amp_found_inf(found_inf))
            return skip_read[0]

        for group, params, grads, foreach, fused in checked:
            device_kernel = fused and F._device_kernel_for(params)
            if not device_kernel and skipped():
                continue  # before any state is created: a skipped step changes nothing
            exp_avgs, exp_avg_sqs, step_tensors, created = self._init_state(params)
            if device_kernel:
                # the device kernel: counters on the device, found_inf and a tensor lr read there
                # (no host synchronisation, docs/algorithm.md §3)
                step_tensors = self._device_steps(params, step_tensors)
                torch._foreach_add_(step_tensors, 1.0)
                if F._fused_device_update(
                    *F._real_views(params, grads, exp_avgs, exp_avg_sqs), step_tensors, rule=self.rule,
                    lr=_on_device(group["lr"], params[0].device), beta=group["beta"], maximize=group["maximize"],
                    grad_scale=grad_scale, found_inf=found_inf,
                ):
                    if found_inf is not None:
                        torch._foreach_sub_(step_tensors, found_inf)  # a skipped step is not counted
                    continue
                foreach, fused, created = True, False, True  # warned once: the multi-tensor path
                if skipped():
                    torch._foreach_sub_(step_tensors, 1.0)
                    continue
            else:
                torch._foreach_add_(step_tensors, 1.0)  # one call, not one per parameter
            F._run_step(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                self._read_steps(id(group), step_tensors, created),
                rule=self.rule,
                lr=group["lr"],
                beta=group["beta"],
                maximize=group["maximize"],
                foreach=foreach,
                fused=fused,
                tile_numel=self._tile_numel,
                grad_scale=grad_scale,
            )
        return loss

    @torch.no_grad()
    def nonfinite_state(self) -> List[Tuple[int, int]]:
        """(param group, index in group) of every parameter whose state holds NaN or inf."""
        found = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                state = self.state.get(p)
                if not state:
                    continue
                buffers = [state[key] for key in ("exp_avg", "exp_avg_sq") if key in state]
                if not all(bool(torch.isfinite(b).all()) for b in buffers):
                    found.append((gi, pi))
        return found


class _VarianceAdapted(DissectedOptimizer):
    """Adds :meth:`variance_adaptation_factors` to the variance-adapted members."""

    @torch.no_grad()
    def variance_adaptation_factors(self) -> List[Tensor]:
        """γ of the latest step, for every parameter with state, in ``param_groups`` order.

        Computed from the state (m~, v~, step) on each call, so nothing is stored twice;
        each tensor has the parameter's shape and device, values in [0, 1] (float32 for
        16-bit parameters; a complex parameter's γ is that of its real view, shape
        ``p.shape + (2,)``, see :mod:`lightning_msvag.factors`). Read-only: the optimizer is not changed. The same walk as the
        γ monitor's (:func:`lightning_msvag.factors.dissected_factors`).
        """
        return [factor.gamma for factor in dissected_factors(self)]


#: Top-level key of a variance-adapted optimizer's state dict: the estimator behind exp_avg_sq.
VARIANCE_KEY = "variance"


def _record_variance(optimizer: "_VarianceChoice", state_dict: dict) -> None:
    state_dict[VARIANCE_KEY] = optimizer.rule.variance


def _check_variance(optimizer: "_VarianceChoice", state_dict: dict) -> None:
    saved = state_dict.get(VARIANCE_KEY)  # absent: a state dict of 0.1.0 (moving average only) or of another class
    if saved is not None and saved != optimizer.rule.variance:
        name = type(optimizer).__name__
        raise ValueError(
            f"{name}: this state was built with variance={saved!r}, the optimizer has variance="
            f"{optimizer.rule.variance!r}; exp_avg_sq holds another estimator's numbers (docs/algorithm.md §1.1): "
            f"build {name}(..., variance={saved!r}) to load it"
        )


class _VarianceChoice(_VarianceAdapted):
    """The constructor switch ``variance`` of the variance-adapted members (docs/algorithm.md §1.1).

    ``variance="moving_average"`` (default): the paper's estimate from m~ and v~.
    ``variance="minibatch"``: the mini-batch estimate σ̂² of each step, read from every
    parameter's ``grad_batch_variance`` (left there by
    :class:`~lightning_msvag.batch_variance.BatchVarianceEstimator` or
    :class:`~lightning_msvag.batch_variance_callback.BatchVarianceCallback`). Then
    :meth:`step` raises ``RuntimeError`` before changing anything if a parameter with a
    gradient has none. All paths take it, the fused CPU kernel included (σ̂² is its fifth operand).
    The instance's :attr:`rule` carries the choice (the class attribute is the default).
    """

    #: constructor argument -> UpdateRule field (what :meth:`rule_for` maps)
    _RULE_ARGS = {"variance": "variance"}

    def __init__(self, params: Iterable, lr: float = 1e-3, beta: float = 0.9, *,
                 variance: str = "moving_average", **kwargs) -> None:
        self.rule = type(self).rule_for(variance=variance)
        # A direct super().__init__(**kwargs): LightningCLI (jsonargparse) follows it to list
        # the base class's options (foreach, fused, ...).
        super().__init__(params, lr, beta, **kwargs)
        self._record_estimator()

    def _record_estimator(self) -> None:
        # exp_avg_sq holds v~ (moving average) or var̂[m]'s raw u / σ̂² (mini-batch): the state
        # dict says which, and a load into the other estimator is refused (torch's public hooks;
        # torch ignores the extra top-level key).
        self.register_state_dict_post_hook(_record_variance)
        self.register_load_state_dict_pre_hook(_check_variance)

    @classmethod
    def rule_for(cls, **init_args) -> UpdateRule:
        """The :class:`~lightning_msvag.rule.UpdateRule` an instance built with ``init_args`` runs
        (the method table's rows with ``init_args`` read it). ``ValueError`` for a bad value."""
        fields = {cls._RULE_ARGS[k]: v for k, v in init_args.items() if k in cls._RULE_ARGS}
        return dataclasses.replace(cls.rule, **fields)

    @property
    def needs_batch_variance(self) -> bool:
        """Whether each step needs ``p.grad_batch_variance`` (e.g. for the CLI to add the
        :class:`~lightning_msvag.batch_variance_callback.BatchVarianceCallback`)."""
        return self.rule.needs_batch_variance

    def _check_batch_variance(self) -> None:
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                s = getattr(p, "grad_batch_variance", None)
                if s is None or s.shape != p.shape:
                    raise RuntimeError(
                        f"{type(self).__name__}(variance='minibatch') needs the mini-batch variance estimate "
                        f"(parameter {pi} of group {gi} has {'none' if s is None else 'one of the wrong shape'}): "
                        "record the backward pass with lightning_msvag.batch_variance.BatchVarianceEstimator "
                        "or add BatchVarianceCallback"
                    )

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """One step; with ``variance="minibatch"`` every parameter with a gradient must carry
        ``grad_batch_variance`` (checked after ``closure``, before anything changes)."""
        if not self.rule.needs_batch_variance:
            return super().step(closure)
        loss = None
        if closure is not None:  # the closure's backward pass is what records the estimate
            with torch.enable_grad():
                loss = closure()
        self._check_batch_variance()
        if getattr(self, "grad_scale", None) is not None:  # before anything changes
            raise RuntimeError(
                f"{type(self).__name__}(variance='minibatch'): the mini-batch variance estimate does not take a "
                "GradScaler's scaled gradients (16-mixed); train in 32 or bf16-mixed"
            )
        super().step()
        return loss


class MSGD(DissectedOptimizer):
    """M-SGD: momentum SGD with bias-corrected moving average, θ ← θ − α m (docs/algorithm.md §1).

    ``MSGD(params, lr, beta=0.9)``. Note the (1−β) weighting and the bias correction:
    α here corresponds to α/(1−β) of ``torch.optim.SGD(momentum=β)`` in the long run.
    """

    rule = UpdateRule(direction="momentum", sign=False, variance_adaptation=False)


class MSSD(DissectedOptimizer):
    """M-SSD: stochastic sign descent on the momentum, θ ← θ − α sign(m~) (docs/algorithm.md §1).

    sign(0) = 0: a coordinate whose moving average is exactly zero does not move.
    """

    rule = UpdateRule(direction="momentum", sign=True, variance_adaptation=False)


class MSVAG(_VarianceChoice):
    """M-SVAG: variance-adapted momentum SGD, θ ← θ − α γ ⊙ m with γ = m²/(m² + ρ s).

    Paper §4 (Alg. 1 and 2) / docs/algorithm.md §1. The first step (k = 1) is an SGD step α g; γ ∈ [0, 1], and
    γ = 0 (no update) where m = v = 0. Two buffers per parameter.

    ``MSVAG(params, lr, beta, variance="minibatch")``: γ = m²/(m² + var̂[m]) with the
    mini-batch estimate var̂[m] = u/(1−β^k)², u ← β² u + (1−β)² σ̂² (kept in ``exp_avg_sq``;
    docs/algorithm.md §1.1); needs ``p.grad_batch_variance`` every step (see :class:`_VarianceChoice`).
    """

    rule = UpdateRule(direction="momentum", sign=False, variance_adaptation=True)


class SVAG(_VarianceChoice):
    """SVAG: variance adaptation on the raw gradient, θ ← θ − α γ ⊙ g, γ = m²/(m² + s).

    docs/algorithm.md §1. Two buffers per parameter.

    ``SVAG(params, lr, beta, variance="minibatch")``: γ = m²/(m² + σ̂²) with this step's
    mini-batch estimate σ̂² of var[g] (kept in ``exp_avg_sq``; docs/algorithm.md §1.1).
    """

    rule = UpdateRule(direction="gradient", sign=False, variance_adaptation=True)


class SSD(DissectedOptimizer):
    """SSD: stochastic sign descent on the raw gradient, θ ← θ − α sign(g) (docs/algorithm.md §1).

    The paper's sign-descent baseline (Fig. 1, §2, §5): the sign of the momentum-free
    gradient. No moving average and no buffers (``beta`` is accepted for a uniform interface
    and has no effect); sign(0) = 0.
    """

    rule = UpdateRule(direction="gradient", sign=True, variance_adaptation=False)


class MSSDVA(_VarianceChoice):
    """M-SSD-VA: sign descent on the momentum with variance adaptation, θ ← θ − α γ^s ⊙ sign(m~).

    The fourth corner of the paper's 2×2 (Fig. 1) with the paper's own estimator
    (docs/algorithm.md §1.2): η² = ρ s / m² is the relative variance of m, and
    ``factor="erf"`` (default) applies the optimal γ^s = erf[(√2 η)⁻¹] (paper §3.1),
    ``factor="sqrt"`` Adam's implicit γ^s = (1 + η²)^−½ (paper Fig. 3). Not Adam: one β,
    no ε, the bias-corrected variance estimate of M-SVAG. γ^s = 0 where m = v = 0; at
    k = 1 (s = 0) γ^s = 1, an M-SSD step. ``variance="minibatch"`` takes var[m] from the
    mini-batch estimate instead (docs/algorithm.md §1.1).

    :meth:`variance_adaptation_factors` (and the γ monitor) report M-SVAG's
    γ = 1/(1 + η²) of the same state, the family's common scale; :meth:`sign_factors`
    the γ^s the step applied.
    """

    rule = UpdateRule(direction="momentum", sign=True, variance_adaptation=True, sign_factor="erf")
    _RULE_ARGS = {"variance": "variance", "factor": "sign_factor"}

    def __init__(self, params: Iterable, lr: float = 1e-3, beta: float = 0.9, *, factor: str = "erf",
                 variance: str = "moving_average", **kwargs) -> None:
        self.rule = type(self).rule_for(factor=factor, variance=variance)
        super(_VarianceChoice, self).__init__(params, lr, beta, **kwargs)
        self._record_estimator()

    @torch.no_grad()
    def sign_factors(self) -> List[Tensor]:
        """γ^s of the latest step per parameter with state, in ``param_groups`` order (read-only)."""
        return [factor.gamma for factor in dissected_sign_factors(self)]


def _step_tensor(step) -> Tensor:
    """A loaded ``step`` as the optimizers keep it: a float32 0-dim tensor (its device kept).

    Old checkpoints and hand-edited states carry a number or an integer tensor; torch's
    Adam accepts them too (its ``__setstate__`` converts them).
    """
    if isinstance(step, Tensor):
        if step.dtype == torch.float32 and step.dim() == 0:
            return step
        return step.detach().reshape(()).to(torch.float32)
    return torch.tensor(float(step), dtype=torch.float32)


def _on_device(lr, device: torch.device):
    """A tensor lr where the device kernel dereferences it (a float travels as an argument)."""
    if isinstance(lr, Tensor) and lr.device != device:
        return lr.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())
    return lr


def _check_hyperparameters(name: str, lr, beta) -> None:
    if isinstance(beta, Tensor):
        raise ValueError(f"{name}: beta must be a Python number, not a tensor")
    if isinstance(lr, Tensor):
        F._check_lr(lr)  # 1-element (torch's wording otherwise), a finite number >= 0 on CPU
        return
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{name}: invalid learning rate {lr!r} (need a finite number >= 0)")
    if not isinstance(beta, (int, float)) or not (0.0 <= beta < 1.0):
        raise ValueError(f"{name}: invalid beta {beta!r} (need 0 <= beta < 1)")
