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
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import batch_estimate
from . import functional as F
from .factors import dissected_factors, dissected_sign_factors
from .functional import CPU_TILE_NUMEL, _default_paths
from .rule import UpdateRule

__all__ = ["DissectedOptimizer", "MSGD", "MSSD", "MSVAG", "SVAG", "SSD", "MSSDVA"]


class _RuleAttribute:
    """``rule`` of the family: on the class, the class's rule (its constructor defaults); on an
    instance, the rule its ``defaults`` select (``variance``, ``factor``: :meth:`DissectedOptimizer.rule_of`).

    Not an instance attribute, so nothing of the configuration lives outside ``defaults`` and the
    param groups, where torch keeps hyperparameters: ``copy.deepcopy``, ``pickle`` and
    ``state_dict`` carry it (an instance attribute would be lost by ``Optimizer.__getstate__``).
    """

    def __get__(self, optimizer, owner=None) -> UpdateRule:
        if optimizer is None:
            return owner._default_rule
        return optimizer.rule_of(optimizer.defaults)


#: (class rule, its fields' new values) -> the rule: a plain dict (torch.compile reads it; an
#: lru_cache it would trace around)
_RULES: Dict[Tuple[UpdateRule, Tuple[Tuple[str, Any], ...]], UpdateRule] = {}


def _rule_with(rule: UpdateRule, fields: Tuple[Tuple[str, Any], ...]) -> UpdateRule:
    key = (rule, fields)
    found = _RULES.get(key)
    if found is None:
        found = _RULES[key] = dataclasses.replace(rule, **dict(fields))
    return found


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

    Every argument that changes the numbers is a hyperparameter in ``defaults`` and in each
    param group (as torch keeps ``lr``), so copies, pickles and state dicts carry it; the
    variance-adapted members add ``variance`` (and M-SSD-VA ``factor``), which a param group
    may set for itself. :meth:`load_state_dict` refuses the state of another method or of
    another ``variance``/``factor`` in one line, before anything changes.
    """

    rule: UpdateRule = UpdateRule()
    #: the class's rule (what ``Class.rule`` returns; a plain attribute, which torch.compile reads)
    _default_rule: UpdateRule = UpdateRule()
    #: constructor argument (= param-group key) -> the :class:`UpdateRule` field it sets
    _RULE_ARGS: Dict[str, str] = {}
    #: CPU tile size of the functional core (an implementation detail, not a hyperparameter:
    #: it changes speed, not results). ``None`` processes whole tensors.
    _tile_numel: Optional[int] = CPU_TILE_NUMEL

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        rule = cls.__dict__.get("rule")
        if isinstance(rule, UpdateRule):
            cls._default_rule = rule
            cls.rule = _RuleAttribute()

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
        self.register_state_dict_post_hook(_record_rule)
        self.register_load_state_dict_pre_hook(_check_loadable)

    def _set_rule_defaults(self, **rule_args) -> None:
        """Make the rule's constructor arguments (``variance``, ``factor``) hyperparameters: into
        ``defaults`` and every param group that does not set its own (validated: ``ValueError``)."""
        self.defaults.update(rule_args)
        for group in self.param_groups:
            for key, value in rule_args.items():
                group.setdefault(key, value)
            self.rule_of(group)

    @classmethod
    def rule_for(cls, **init_args) -> UpdateRule:
        """The :class:`~lightning_msvag.rule.UpdateRule` an instance built with ``init_args`` runs
        (the method table's rows with ``init_args`` read it). ``ValueError`` for a bad value."""
        fields = tuple(sorted((cls._RULE_ARGS[k], v) for k, v in init_args.items() if k in cls._RULE_ARGS))
        try:
            return _rule_with(cls._default_rule, fields)
        except TypeError:  # an unhashable value (a list, ...): let UpdateRule say what it expects
            return dataclasses.replace(cls._default_rule, **dict(fields))

    def rule_of(self, group: dict) -> UpdateRule:
        """The rule a param group (or ``defaults``) steps with: the class's, with the group's
        ``variance``/``factor`` where the class has them."""
        if not self._RULE_ARGS:
            return type(self)._default_rule
        return type(self).rule_for(**{k: group[k] for k in self._RULE_ARGS if k in group})

    @property
    def needs_batch_variance(self) -> bool:
        """Whether a step needs ``p.grad_batch_variance`` (some group has ``variance="minibatch"``;
        e.g. for the CLI to add the :class:`~lightning_msvag.batch_variance_callback.BatchVarianceCallback`)."""
        return any(self.rule_of(group).needs_batch_variance for group in self.param_groups)

    def add_param_group(self, param_group: dict) -> None:
        """Validate ``lr``, ``beta`` and the rule's keys (the group's, else the defaults) *before*
        adding the group: a rejected group raises ``ValueError`` and leaves the optimizer unchanged."""
        if isinstance(param_group, dict):
            defaults = getattr(self, "defaults", {})
            _check_hyperparameters(
                type(self).__name__, param_group.get("lr", defaults.get("lr")), param_group.get("beta", defaults.get("beta"))
            )
            self.rule_of({**defaults, **param_group})
        super().add_param_group(param_group)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._uniform_steps = {}  # the state may have changed: read every counter once
        rule = type(self)._default_rule
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("error_if_nonfinite", False)
            for key, field in self._RULE_ARGS.items():  # a pickle of 0.1.0: the class's rule
                group.setdefault(key, getattr(rule, field))
            for p in group["params"]:
                p_state = self.state.get(p)
                if p_state and "step" in p_state:
                    p_state["step"] = _step_tensor(p_state["step"])
        for key, field in self._RULE_ARGS.items():
            self.defaults.setdefault(key, getattr(rule, field))

    def _checked_groups(self) -> List[tuple]:
        """Every group's (group, rule, params, grads, foreach, fused), after checking everything a
        step can refuse: hyperparameters, sparse gradients, the path's requirements. Nothing is
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
            rule = self.rule_of(group)
            if group["fused"] and group["foreach"]:
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
            foreach, fused = _default_paths(params, group["foreach"], group["fused"], rule)
            F._check_step_inputs(params, grads, lr=group["lr"], foreach=foreach, fused=fused)
            checked.append((group, rule, params, grads, foreach, fused))
        return checked

    def _init_state(self, params: List[Tensor], rule: UpdateRule):
        """The buffers and step tensors of ``params``, created (zeros, step 0) where missing;
        also the parameters whose state was created here."""
        exp_avgs, exp_avg_sqs, step_tensors = [], [], []
        created = []
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                created.append(p)
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                # complex parameters: complex buffers, stepped through their real views
                if rule.needs_first_moment:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if rule.needs_second_moment:
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state.get("exp_avg"))
            exp_avg_sqs.append(state.get("exp_avg_sq"))
            step_tensors.append(state["step"])
        return exp_avgs, exp_avg_sqs, step_tensors, created

    def _init_group(self, group: dict, params: list, grads: list, exp_avgs: list, exp_avg_sqs: list,
                    step_tensors: list) -> bool:
        """Fill the lists with the group's parameters that have a gradient, their gradients, buffers
        and step counters (the state created where missing); whether any parameter is complex.

        torch's optimizers' name and protocol: inside ``torch.compile`` Dynamo runs a method of
        this name eagerly instead of tracing it, so the graph starts with the state made and one
        graph serves the first step and every later one (no recompilation at step 2)."""
        found = [p for p in group["params"] if p.grad is not None]
        params.extend(found)
        grads.extend(p.grad for p in found)
        m, v, k, _ = self._init_state(found, self.rule_of(group))
        if not all(p.is_cpu for p in found):  # counters on the parameters' devices, as torch's fused Adam keeps them
            k = self._device_steps(found, k)
        exp_avgs.extend(m)
        exp_avg_sqs.extend(v)
        step_tensors.extend(k)
        return any(torch.is_complex(p) for p in found)

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

    def _batch_variances(self, checked: List[tuple], grad_scale) -> Dict[int, List[Tensor]]:
        """σ̂² per stepped parameter of every ``variance="minibatch"`` group (id(group) -> list), as
        :func:`~lightning_msvag.batch_estimate.take` finds them: missing, stale or describing
        another gradient raises here, before anything changes (docs/algorithm.md §1.1)."""
        found: Dict[int, List[Tensor]] = {}
        name = type(self).__name__
        group_index = {id(group): gi for gi, group in enumerate(self.param_groups)}
        for group, rule, params, _, _, _ in checked:
            if not rule.needs_batch_variance:
                continue
            if grad_scale is not None:
                raise RuntimeError(
                    f"{name}(variance='minibatch'): the mini-batch variance estimate does not take a "
                    "GradScaler's scaled gradients (16-mixed); train in 32 or bf16-mixed"
                )
            gi = group_index[id(group)]
            index = {id(p): i for i, p in enumerate(group["params"])}
            found[id(group)] = [
                batch_estimate.take(p, f"{name}(variance='minibatch')", f"parameter {index[id(p)]} of group {gi}")
                for p in params
            ]
        return found

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Perform one step. ``closure`` re-evaluates the model and returns the loss.

        Everything that can be refused is refused before any state is created or any
        counter advanced (a step that raises is a no-op). Under a ``torch.amp.GradScaler``
        with ``fused=True`` (see the class): the gradients are divided by the scaler's
        ``grad_scale`` inside the update, and a nonzero ``found_inf`` skips the step
        entirely (state, counters and parameters unchanged). Groups with
        ``variance="minibatch"`` use each parameter's mini-batch estimate once
        (:mod:`lightning_msvag.batch_estimate`; checked after ``closure``, before anything changes).
        Inside ``torch.compile`` the step is :meth:`_compiled_step`.
        """
        if torch.compiler.is_compiling():
            return self._compiled_step(closure)
        loss = None
        if closure is not None:  # with variance="minibatch", its backward pass records the estimate
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
        batch_variances = self._batch_variances(checked, grad_scale)
        skip_read: List[bool] = []  # found_inf read on the host once, only where a host path needs it

        def skipped() -> bool:
            if not skip_read:
                skip_read.append(found_inf is not None and F._amp_found_inf(found_inf))
            return skip_read[0]

        for group, rule, params, grads, foreach, fused in checked:
            device_kernel = fused and not rule.needs_batch_variance and F._device_kernel_for(params)
            if not device_kernel and skipped():
                continue  # before any state is created: a skipped step changes nothing
            exp_avgs, exp_avg_sqs, step_tensors, created = self._init_state(params, rule)
            try:
                self._step_group(group, rule, params, grads, foreach, fused, device_kernel, exp_avgs, exp_avg_sqs,
                                 step_tensors, created, grad_scale, found_inf, skipped, batch_variances.get(id(group)))
            except BaseException:
                # nothing of this group is written when a path refuses (they check before writing):
                # the counters and the state created for it go back to what they were
                for p in created:
                    self.state.pop(p, None)
                raise
        for group, rule, params, _, _, _ in checked:
            if rule.needs_batch_variance:
                batch_estimate.consume(params)  # one estimate, one step
        return loss

    def _compiled_step(self, closure: Optional[Callable[[], float]] = None):
        """:meth:`step` inside ``torch.compile`` (``fullgraph=True`` holds; docs/algorithm.md §3). The
        step counters advance in the graph; a group of CPU tensors then steps through
        :func:`~lightning_msvag.functional._compiled_cpu_step` (the eager step as one operator,
        bitwise), any other group through :func:`~lightning_msvag.functional._compiled_update`, the
        update traced with every scalar computed in the graph from the tensor's own step counter, so
        nothing is read back to the host and one graph serves every step. Refused before any counter
        moves: what needs a host read (``error_if_nonfinite=True``, a GradScaler's fused protocol),
        sparse gradients, ``fused`` and ``foreach`` both set; a tensor ``lr`` is not range-checked. A
        mini-batch estimate that no longer describes its gradient raises when the step runs
        (``torch._assert_async``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        name = type(self).__name__
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            raise RuntimeError(f"{name}: a GradScaler's fused protocol (fused=True) does not run inside torch.compile; "
                               "step outside it, or leave fused unset so that the scaler unscales the gradients itself")
        used: List[List[Tensor]] = []
        for gi, group in enumerate(self.param_groups):
            params, grads, exp_avgs, exp_avg_sqs, step_tensors = [], [], [], [], []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, step_tensors)
            if not params:
                continue
            if group["error_if_nonfinite"]:
                raise RuntimeError(f"{name}: error_if_nonfinite=True reads every gradient on the host, which "
                                   "torch.compile cannot; check outside the compiled step")
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError(f"{name} does not support sparse gradients")
            if group["fused"] and group["foreach"]:
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")  # torch's wording, as step()
            if not isinstance(group["lr"], Tensor):
                _check_hyperparameters(name, group["lr"], group["beta"])
            rule = self.rule_of(group)
            variances = None
            if rule.needs_batch_variance:
                index = {id(p): i for i, p in enumerate(group["params"])}
                variances = [batch_estimate.take(p, f"{name}(variance='minibatch')", f"parameter {index[id(p)]} of group {gi}")
                             for p in params]
                used.append(params)
            torch._foreach_add_(step_tensors, 1.0)
            if F.COMPILED_CPU_STEP_AS_OPERATOR and all(p.is_cpu for p in params):
                # the eager CPU step as one operator: faster on CPU than what inductor makes of the math
                F._compiled_cpu_step(params, grads, exp_avgs, exp_avg_sqs, step_tensors, rule=rule, lr=group["lr"],
                                     beta=group["beta"], maximize=group["maximize"], tile_numel=self._tile_numel,
                                     foreach=group["foreach"], fused=group["fused"], batch_variances=variances)
                continue
            F._compiled_update(params, grads, exp_avgs, exp_avg_sqs, step_tensors, rule=rule, lr=group["lr"],
                               beta=group["beta"], maximize=group["maximize"], batch_variances=variances)
        for params in used:
            batch_estimate.consume(params)  # one estimate, one step
        return loss

    def _step_group(self, group, rule, params, grads, foreach, fused, device_kernel, exp_avgs, exp_avg_sqs,
                    step_tensors, created, grad_scale, found_inf, skipped, batch_variances) -> None:
        """One group's update (its state exists); advances its counters only for a step it takes."""
        if device_kernel:
            # the device kernel: counters on the device, found_inf and a tensor lr read there
            # (no host synchronisation, docs/algorithm.md §3)
            step_tensors = self._device_steps(params, step_tensors)
            torch._foreach_add_(step_tensors, 1.0)
            try:
                done = F._fused_device_update(
                    *F._real_views(params, grads, exp_avgs, exp_avg_sqs), step_tensors, rule=rule,
                    lr=_on_device(group["lr"], params[0].device), beta=group["beta"], maximize=group["maximize"],
                    grad_scale=grad_scale, found_inf=found_inf,
                )
            except BaseException:
                torch._foreach_sub_(step_tensors, 1.0)
                raise
            if done:
                if found_inf is not None:
                    torch._foreach_sub_(step_tensors, found_inf)  # a skipped step is not counted
                return
            torch._foreach_sub_(step_tensors, 1.0)
            foreach, fused, created = True, False, params  # warned once: the multi-tensor path
            if skipped():
                return
        torch._foreach_add_(step_tensors, 1.0)  # one call, not one per parameter
        try:
            F._run_step(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                self._read_steps(id(group), step_tensors, bool(created)),
                rule=rule,
                lr=group["lr"],
                beta=group["beta"],
                maximize=group["maximize"],
                foreach=foreach,
                fused=fused,
                tile_numel=self._tile_numel,
                grad_scale=grad_scale,
                batch_variances=batch_variances,
            )
        except BaseException:
            torch._foreach_sub_(step_tensors, 1.0)
            self._uniform_steps.pop(id(group), None)
            raise

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


DissectedOptimizer.rule = _RuleAttribute()


# ------------------------------------------------------------------ state dicts
#: Top-level key of the family's state dicts: the method (its rule's direction and two switches).
RULE_KEY = "rule"
#: Top-level key written by 0.1.0's variance-adapted classes (read for their states only).
_OLD_VARIANCE_KEY = "variance"
_METHOD_FIELDS = ("direction", "sign", "variance_adaptation")


def _method_of(rule: UpdateRule) -> Dict[str, Any]:
    return {name: getattr(rule, name) for name in _METHOD_FIELDS}


def _record_rule(optimizer: "DissectedOptimizer", state_dict: dict) -> None:
    # torch ignores extra top-level keys; the param groups carry variance/factor themselves
    state_dict[RULE_KEY] = _method_of(type(optimizer)._default_rule)


def _state_buffers(rule: UpdateRule) -> set:
    return {"step"} | ({"exp_avg"} if rule.needs_first_moment else set()) | ({"exp_avg_sq"} if rule.needs_second_moment else set())


def _check_loadable(optimizer: "DissectedOptimizer", state_dict: dict) -> Optional[dict]:
    """``load_state_dict`` pre-hook: refuse, in one line and before anything changes, a state of
    another method (recorded, or told by its buffers and keys: torch's Adam, 0.1.0's states) or
    of another ``variance``/``factor``; fill what 0.1.0's states did not record."""
    name = type(optimizer).__name__
    mine = type(optimizer)._default_rule
    saved_method = state_dict.get(RULE_KEY)
    groups = state_dict.get("param_groups", [])
    if saved_method is not None:
        if dict(saved_method) != _method_of(mine):
            saved_rule = dataclasses.replace(UpdateRule(), **dict(saved_method))
            raise ValueError(
                f"{name}.load_state_dict: the state is {saved_rule.label}'s, this optimizer is {mine.label} "
                f"({name}): its buffers hold {saved_rule.label}'s numbers; load it into {saved_rule.label.replace('-', '')}"
            )
    else:  # no record: torch's optimizers, or a state of 0.1.0
        if any("beta" not in g for g in groups):
            keys = sorted({k for g in groups for k in g if k != "params"})
            raise ValueError(
                f"{name}.load_state_dict: not a state of this project's optimizers (no 'beta' in its param groups, "
                f"which have: {', '.join(keys)}); load it into the optimizer class that saved it"
            )
        wanted = _state_buffers(mine)
        for index, entry in state_dict.get("state", {}).items():
            if entry and set(entry) != wanted:
                raise ValueError(
                    f"{name}.load_state_dict: the state of parameter {index} holds {sorted(entry)}, {mine.label} keeps "
                    f"{sorted(wanted)}: it is another method's state"
                )
    if not optimizer._RULE_ARGS or len(groups) != len(optimizer.param_groups):
        return None  # torch's own check reports a group count that differs
    old_variance = state_dict.get(_OLD_VARIANCE_KEY, "moving_average")
    filled = []
    for i, (saved, current) in enumerate(zip(groups, optimizer.param_groups)):
        saved = dict(saved)
        for key in optimizer._RULE_ARGS:
            # 0.1.0 recorded the estimator at the top level (moving average where absent) and no factor
            value = saved.get(key, old_variance if key == "variance" else current.get(key))
            if value != current.get(key):
                raise ValueError(
                    f"{name}.load_state_dict: param group {i} of the state was built with {key}={value!r}, this "
                    f"optimizer's with {key}={current.get(key)!r} (its buffers hold the other setting's numbers, "
                    f"docs/algorithm.md §1.1–1.2): build {name}(..., {key}={value!r}) to load it"
                )
            saved[key] = value
        filled.append(saved)
    return {**state_dict, "param_groups": filled}


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


class _VarianceChoice(_VarianceAdapted):
    """The hyperparameter ``variance`` of the variance-adapted members (docs/algorithm.md §1.1).

    ``variance="moving_average"`` (default): the paper's estimate from m~ and v~.
    ``variance="minibatch"``: the mini-batch estimate σ̂² of each step, read from every
    parameter's ``grad_batch_variance`` (left there by
    :class:`~lightning_msvag.batch_variance.BatchVarianceEstimator` or
    :class:`~lightning_msvag.batch_variance_callback.BatchVarianceCallback`) and used up by the
    step (:mod:`lightning_msvag.batch_estimate`): :meth:`step` raises ``RuntimeError`` before
    changing anything if a parameter with a gradient has none, or one that describes another
    gradient. All paths take it, the fused CPU kernel included (σ̂² is its fifth operand).
    Like ``lr``, ``variance`` lives in ``defaults`` and each param group.
    """

    _RULE_ARGS = {"variance": "variance"}

    def __init__(self, params: Iterable, lr: float = 1e-3, beta: float = 0.9, *,
                 variance: str = "moving_average", **kwargs) -> None:
        type(self).rule_for(variance=variance)  # a bad value raises before anything is built
        # A direct super().__init__(**kwargs): LightningCLI (jsonargparse) follows it to list
        # the base class's options (foreach, fused, ...).
        super().__init__(params, lr, beta, **kwargs)
        self._set_rule_defaults(variance=variance)


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
        type(self).rule_for(factor=factor, variance=variance)  # a bad value raises before anything is built
        super(_VarianceChoice, self).__init__(params, lr, beta, **kwargs)
        self._set_rule_defaults(factor=factor, variance=variance)

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
    # abs(lr) < inf is math.isfinite(lr) in a form torch.compile also traces for a float that
    # changes between steps (a scheduler's: Dynamo makes it symbolic, math.isfinite it cannot take)
    if not isinstance(lr, (int, float)) or not abs(lr) < math.inf or lr < 0:
        raise ValueError(f"{name}: invalid learning rate {lr!r} (need a finite number >= 0)")
    if not isinstance(beta, (int, float)) or not (0.0 <= beta < 1.0):
        raise ValueError(f"{name}: invalid beta {beta!r} (need 0 <= beta < 1)")
