"""Mini-batch gradient variance from per-example gradients, in one backward pass (paper §4.1).

The mini-batch estimate of "Dissecting Adam" (Balles & Hennig 2018, §4.1; docs/algorithm.md
§1.1) replaces the moving-average variance estimate by one computed *within* a mini-batch of
B examples from the per-example gradients ∇ℓ_k of the data term of the loss. Per parameter
coordinate::

    ḡ   = (1/B) Σ_k ∇ℓ_k                               (the data term's mean gradient)
    σ̂²  = [ (1/B) Σ_k ∇ℓ_k²  −  ḡ² ] / (B − 1)

σ̂² is the unbiased estimate of var[ḡ], the variance of the *mini-batch mean* gradient, for B
examples drawn i.i.d.: the bracket times B/(B−1) is the unbiased sample variance of one
example's gradient, and var[ḡ] is that over B. With ``loss_reduction="sum"`` the optimizer
receives Σ_k ∇ℓ_k = B ḡ, and the estimate is B² σ̂², the variance of *that* gradient (under DDP,
which averages the W processes' sums: (B/W)² σ̂²).

Mechanism: forward hooks store each supported layer's input, tensor hooks store the gradient
of its output; after the (single) backward pass the per-example gradients are formed layer by
layer (:mod:`lightning_msvag.per_example`), squared and summed. Nothing is computed B times.

**Shared parameters.** A parameter used by several recorded calls (a weight shared by two
layers, an output layer tied to the embedding through a shared ``nn.Parameter``, a layer called
twice) gets the exact per-example sum over its uses: the calls' per-example gradients are added
before squaring, a chunk of examples at a time. Every other use of a tracked parameter inside
the model's modules (a functional call such as ``F.linear(h, self.emb.weight)``) is found in the
autograd graph after the backward pass and refused in one line naming the parameter: its
per-example gradients are unknown. A term of the loss computed from the parameters alone
outside the model (an L2 term) is deterministic and carries no variance: it is not part of ḡ
(the hooks never see it) and is fine.

**Contract.**

* The loss is ``(1/B) Σ_k ℓ_k + R(θ)`` with R deterministic (``loss_reduction="mean"``, the
  default), or ``Σ_k ℓ_k + R(θ)`` (``loss_reduction="sum"``). Example k is row k of dim 0 of
  every supported layer's input and output (also in every call of a layer called more than
  once); for a per-character loss averaged over B×T positions, ℓ_k is row k's mean over T.
  What no rule can see — inputs laid out time-major, a layer without parameters that mixes the
  rows of a batch — :func:`lightning_msvag.batch_variance_check.check_batch_variance` finds
  against brute-force per-example gradients: run it first on a new model.
* One forward and one backward per estimate. A forward pass after the backward pass in the same
  recorded step (gradient accumulation) is refused; :meth:`compute` without a recorded backward
  pass is refused.
* Output: after :meth:`BatchVarianceEstimator.compute` every tracked parameter ``p`` with a
  gradient has ``p.grad_batch_variance`` (σ̂² of ``p.grad``, same shape, dtype and device as
  ``p``); ``compute`` also returns ``{p: σ̂²}``. The optimizer uses each estimate for one step
  and checks that it still describes ``p.grad`` (a uniform rescale such as clipping by norm
  scales it by c²; anything else is refused): :mod:`lightning_msvag.batch_estimate`.
  :meth:`BatchVarianceEstimator.record` removes the previous estimate on entry.
  :attr:`BatchVarianceEstimator.batch_size` holds the (global) B of the last estimate.
* Distributed (``torch.distributed`` initialised, world > 1): Σ_k ∇ℓ_k², Σ_k ∇ℓ_k and B are
  summed over ranks in one all-reduce (twice the gradient size) before σ̂² is formed — a
  per-rank variance is never averaged — so W processes with B/W examples each give the
  one-process estimate for the global batch. Each rank's loss must be the mean over *its* rows
  (what DDP does).
* Precision: the sums are formed in float32 (float64 if the parameter is float64). bfloat16
  autocast is supported (captured tensors are upcast). float16 gradients are refused: they
  come with a loss scaler whose scale would enter Σ∇ℓ² squared.

Refused with a one-line :class:`BatchVarianceError` (never a silent wrong number): BatchNorm in
training mode (it mixes the examples of a batch), a trainable parameter of a layer type
without a per-example rule (:mod:`lightning_msvag.per_example` lists the rules), a use of a
tracked parameter outside its layers, a forward after the backward in one recorded step,
grouped or non-zero-padded convolutions, ``Embedding(max_norm/scale_grad_by_freq/sparse)``,
``nn.LSTM``/``nn.GRU`` (multi-layer fused modules: use one module per layer with the LSTM-layer
protocol), B < 2, float16 gradients.

Use::

    est = BatchVarianceEstimator(model)
    with est.record():
        loss = criterion(model(x), y) + l2_term
        loss.backward()
    variances = est.compute()         # also p.grad_batch_variance for each parameter
    optimizer.step()                   # uses the estimate once
    est.close()                        # removes the hooks

Lightning: :class:`lightning_msvag.batch_variance_callback.BatchVarianceCallback`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import batch_estimate, per_example
from .per_example import LayerCall, LayerRule, UnsupportedLayer

__all__ = ["BatchVarianceEstimator", "BatchVarianceError", "batch_variance_from_moments"]

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class BatchVarianceError(ValueError):
    """A model, loss or step the mini-batch variance estimate cannot handle exactly."""


def batch_variance_from_moments(sum_grad: Tensor, sum_sq: Tensor, batch_size: int) -> Tensor:
    """σ̂² = [(1/B) Σ∇ℓ_k² − ḡ²] / (B − 1) with ḡ = (1/B) Σ∇ℓ_k (paper §4.1).

    Clamped at 0: the bracket is a sum of squares about the mean and only round-off can make
    it negative.
    """
    return _moments_to_variance_(sum_grad.clone(), sum_sq.clone(), batch_size)


def _moments_to_variance_(sum_grad: Tensor, sum_sq: Tensor, batch_size: int) -> Tensor:
    """σ̂² of :func:`batch_variance_from_moments`, formed in place in ``sum_sq`` (``sum_grad``
    becomes ḡ): three passes over the largest layer instead of six."""
    if batch_size < 2:
        raise BatchVarianceError(f"the mini-batch variance needs at least 2 examples, got B = {batch_size}")
    mean = sum_grad.div_(batch_size)
    return sum_sq.div_(batch_size).addcmul_(mean, mean, value=-1).div_(batch_size - 1).clamp_min_(0.0)


def _batchnorm_message(label: str) -> str:
    return (
        f"{label} in training mode normalises over the batch, which mixes its examples: there are no per-example "
        "gradients for the mini-batch variance estimate (variance='minibatch'). Use the moving-average estimate "
        "(m-svag, variance='moving_average'), or a model without batch normalisation in training mode"
    )


def _tensors(value: Any) -> List[Tensor]:
    """The tensors in a module's output (a tensor, or nested tuples/lists/dicts of them)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


class BatchVarianceEstimator:
    """Per-coordinate mini-batch variance σ̂² of the gradient, from per-example gradients (see the module docstring).

    Args:
        model: the module whose parameters get an estimate. Every trainable parameter must
            belong to a supported layer (checked here and at every :meth:`record`).
        loss_reduction: ``"mean"`` (loss = mean over the B examples, the default) or ``"sum"``.
        sync_distributed: all-reduce the moments over ``torch.distributed``'s default group
            when it is initialised with more than one process (default ``True``).
    """

    def __init__(self, model: nn.Module, loss_reduction: str = "mean", sync_distributed: bool = True) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise BatchVarianceError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.model = model
        self.loss_reduction = loss_reduction
        self.sync_distributed = sync_distributed
        self.batch_size: Optional[int] = None
        modules = list(model.named_modules())
        self._labels = {module: f"{type(module).__name__} {name!r}" if name else f"{type(module).__name__} (the model)"
                        for name, module in modules}
        self._batchnorms = [m for _, m in modules if isinstance(m, _BATCHNORM)]
        self._check_batchnorms()  # the reason that matters most comes first (a BatchNorm model is refused for it)
        self._rules: Dict[nn.Module, LayerRule] = {}
        scoped: set = set()  # modules inside a general rule's scope (it covers its whole subtree)
        for _, module in modules:
            if module in scoped or not any(p.requires_grad for p in module.parameters(recurse=False)):
                continue
            try:
                rule = self._rules[module] = per_example.rule_for_module(module, self._labels[module])
            except UnsupportedLayer as error:
                raise BatchVarianceError(str(error)) from None
            if rule is per_example.GENERAL_RULE:
                scoped.update(m for m in module.modules() if m is not module)
        #: every name of each tracked parameter (a shared one has several)
        self._names: Dict[int, List[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self._names.setdefault(id(p), []).append(name)
        self._calls: List[LayerCall] = []
        self._roots: List[Any] = []
        #: autograd node -> ids of the parameters whose recorded calls made it (this step)
        self._owned: Dict[Any, set] = {}
        #: id(p) -> the copy of p.grad each estimate refers to, reused step after step
        self._reference_buffers: Dict[int, Tensor] = {}
        self._armed = False
        self._backward_started = False
        # every module: the supported layers' calls, and the outputs the use check walks from
        self._handles = [m.register_forward_hook(self._forward_hook, with_kwargs=True) for _, m in modules]

    # ----------------------------------------------------------------- setup
    def _check_batchnorms(self) -> None:
        for module in self._batchnorms:
            if module.training:
                raise BatchVarianceError(_batchnorm_message(self._labels[module]))

    def parameters(self) -> Iterator[nn.Parameter]:
        """The tracked (trainable) parameters, each once, in module order."""
        seen = set()
        for module, rule in self._rules.items():
            for _, p in rule.parameters(module):
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def _name(self, p: Tensor) -> str:
        return " = ".join(self._names.get(id(p), ["?"]))

    def close(self) -> None:
        """Remove the forward hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------- recording
    def start(self) -> None:
        """Arm the hooks for one forward + backward; removes the previous estimate."""
        if not self._handles:
            raise RuntimeError("BatchVarianceEstimator is closed")
        self._check_batchnorms()
        for p in self.parameters():
            batch_estimate.clear(p)
        self._calls, self._roots, self._owned = [], [], {}
        self._backward_started = False
        self.batch_size = None
        self._armed = True

    def stop(self) -> None:
        """Disarm the hooks (the recorded tensors are kept for :meth:`compute`)."""
        self._armed = False

    @contextlib.contextmanager
    def record(self) -> Iterator[BatchVarianceEstimator]:
        """``with est.record(): loss.backward()`` — arms the hooks for one forward + backward."""
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._armed or not torch.is_grad_enabled():
            return
        if self._backward_started:
            raise BatchVarianceError(
                f"{self._labels[module]} ran forward after the backward pass of the recorded step (gradient "
                "accumulation?): the mini-batch variance needs one forward and one backward per estimate"
            )
        rule = self._rules.get(module)
        if rule is not None:
            try:
                call = rule.capture(module, args, kwargs, output)
            except UnsupportedLayer as error:
                raise BatchVarianceError(f"{self._labels[module]}: {error}") from None
            self._calls.append(call)
            for i, out in enumerate(call.outputs):
                if out.requires_grad:
                    out.register_hook(self._grad_saver(call, i))
            self._watch_uses(call)
            call.release_graph()
        self._roots.extend(t.grad_fn for t in _tensors(output) if t.grad_fn is not None)

    def _watch_uses(self, call: LayerCall) -> None:
        """The call's own autograd nodes (between its outputs and its inputs) and, on each edge from
        one of them into one of its parameters, a hook that keeps the gradient autograd sends there:
        the sum over the rows of the call's part of the batch gradient, Σ_k of what the rules square
        (so it is never computed twice). The nodes also mark this parameter's known uses for
        :meth:`_check_uses`."""
        own = {id(p): name for name, p in call.rule.parameters(call.module)}
        stop = set(call.in_nodes)
        seen = set()
        stack = list(call.out_nodes)
        data = call.cache.setdefault("data", {})
        while stack:
            node = stack.pop()
            if node is None or node in stop or node in seen:
                continue
            seen.add(node)
            self._owned.setdefault(node, set()).update(own)
            edges = []
            for index, (child, _) in enumerate(node.next_functions):
                if child is None:
                    continue
                if type(child).__name__ == "AccumulateGrad":
                    name = own.get(id(child.variable))
                    if name is not None:
                        edges.append((index, name))
                else:
                    stack.append(child)
            if edges:
                node.register_hook(_data_gradient_keeper(data, edges))

    def _grad_saver(self, call: LayerCall, index: int):
        def hook(grad: Tensor) -> None:
            self._backward_started = True
            if grad.dtype == torch.float16:
                raise BatchVarianceError(
                    "float16 gradients (16-mixed with a loss scaler) are not supported by the mini-batch variance; use bf16 or 32-bit"
                )
            call.grads[index] = grad.detach()

        return hook

    # ------------------------------------------------------------ uses check
    def _check_uses(self) -> None:
        """Refuse a use of a tracked parameter that no recorded call accounts for.

        Each recorded call owns the autograd nodes between its outputs and its inputs (marked when
        it ran, :meth:`_watch_uses`); after the backward pass the graph below every module output
        is walked once, and an edge into a tracked parameter from a node no call of a module owning
        it produced is a use the rules cannot see (docs/algorithm.md §1.1).
        """
        owned = self._owned
        tracked = {id(p) for p in self.parameters()}
        seen = set()
        stack = list(self._roots)
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            for child, _ in node.next_functions:
                if child is None:
                    continue
                variable = getattr(child, "variable", None) if type(child).__name__ == "AccumulateGrad" else None
                if variable is None:
                    stack.append(child)
                elif id(variable) in tracked and id(variable) not in owned.get(node, ()):
                    raise BatchVarianceError(
                        f"parameter {self._name(variable)!r} is used outside the layers that own it (by the operation "
                        f"{type(node).__name__} in the model's forward, e.g. F.linear(h, emb.weight)): its per-example "
                        "gradients are unknown. Use it through a module that shares the parameter "
                        "(head = nn.Linear(...); head.weight = emb.weight), which is exact"
                    )

    # ---------------------------------------------------------------- result
    def compute(self) -> Dict[nn.Parameter, Tensor]:
        """Form σ̂² for every tracked parameter with a gradient from the recorded step; sets ``p.grad_batch_variance``."""
        if self._armed:
            self.stop()
        calls, self._calls = self._calls, []
        if not any(call.reached for call in calls):
            raise BatchVarianceError(
                "compute() found no recorded gradients: call it after loss.backward(), inside or after "
                "est.record() (a forward and a backward pass per estimate)"
            )
        self._check_uses()
        self._roots, self._owned = [], {}
        batch = calls[0].batch
        for call in calls:
            if call.batch != batch:
                raise BatchVarianceError(
                    f"layers saw different batch sizes ({batch} and {call.batch}, {self._labels[call.module]}): "
                    "dim 0 must be the example dimension"
                )
        uses: Dict[int, List[Tuple[LayerCall, str]]] = {}
        params: Dict[int, nn.Parameter] = {}
        for call in calls:
            own = call.rule.parameters(call.module)
            dtype = torch.float64 if own[0][1].dtype == torch.float64 else torch.float32
            call.rule.prepare(call, dtype)
            for name, p in own:
                uses.setdefault(id(p), []).append((call, name))
                params[id(p)] = p
        order: List[nn.Parameter] = []
        sums: List[Tensor] = []
        squares: List[Tensor] = []
        for p in self.parameters():
            if id(p) not in uses and p.grad is not None:
                raise BatchVarianceError(
                    f"parameter {self._name(p)!r} has a gradient, but no layer that owns it ran in the recorded step: "
                    "its per-example gradients are unknown"
                )
        single: Dict[LayerCall, List[str]] = {}
        for pid, found in uses.items():
            if len(found) == 1:
                call, name = found[0]
                single.setdefault(call, []).append(name)
        computed: Dict[int, Tensor] = {}
        for call, names in single.items():
            own = dict(call.rule.parameters(call.module))
            try:
                for name, s2 in call.rule.squares(call, names).items():
                    computed[id(own[name])] = s2
            except UnsupportedLayer as error:
                raise BatchVarianceError(f"{self._labels[call.module]}: {error}") from None
        for pid, found in uses.items():
            if len(found) > 1:
                try:
                    computed[pid] = _shared_squares(params[pid], found, batch)
                except UnsupportedLayer as error:
                    raise BatchVarianceError(f"parameter {self._name(params[pid])!r}: {error}") from None
        for pid, found in uses.items():
            # Σ_k of the rows' parts: what autograd sent into the parameter through its recorded uses
            s2 = computed[pid]
            s1 = torch.zeros_like(s2)
            for call, name in found:
                part = call.cache["data"].get(name)
                if part is not None:
                    s1.add_(part.to(s1.dtype))
            order.append(params[pid])
            sums.append(s1)
            squares.append(s2)
        # row k's part of the batch gradient is ∇ℓ_k / B (mean loss) or ∇ℓ_k (sum): the rules sum the
        # former, so Σ∇ℓ_k and Σ∇ℓ_k² are this rank's sums times B and B² (one pass over the parameters)
        if self.loss_reduction == "mean":
            for s1, s2 in zip(sums, squares):
                s1.mul_(batch)
                s2.mul_(batch * batch)
        batch, world = self._all_reduce(sums, squares, batch)
        self.batch_size = batch
        # the variance of the gradient the optimizer receives: ḡ (mean), or the sum's (B/W)·ḡ
        gradient_scale = 1.0 if self.loss_reduction == "mean" else batch / world
        result: Dict[nn.Parameter, Tensor] = {}
        for p, s1, s2 in zip(order, sums, squares):
            var = _moments_to_variance_(s1, s2, batch)  # the sums are this step's own
            if gradient_scale != 1.0:
                var.mul_(gradient_scale * gradient_scale)
            result[p] = var.to(p.dtype)
            self._attach(p, result[p])
        return result

    def _attach(self, p: nn.Parameter, variance: Tensor) -> None:
        """Hand σ̂² to the optimizer with a reference to the gradient it describes
        (:mod:`~lightning_msvag.batch_estimate`), copied into a buffer kept from step to step."""
        grad = p.grad
        buffer = self._reference_buffers.get(id(p))
        if grad is not None and (buffer is None or buffer.shape != grad.shape or buffer.dtype != grad.dtype
                                 or buffer.device != grad.device):
            buffer = self._reference_buffers[id(p)] = torch.empty_like(grad, memory_format=torch.contiguous_format)
        batch_estimate.attach(p, variance, grad, self._name(p), buffer)

    def _all_reduce(self, sums: List[Tensor], squares: List[Tensor], batch: int) -> Tuple[int, int]:
        """Sum the moments and B over the ranks; returns (global B, world size)."""
        dist = torch.distributed
        if not (self.sync_distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return batch, 1
        # One flat buffer [Σ∇ℓ, Σ∇ℓ², B]: sums, never per-rank variances, are what add up.
        flat = torch.cat([t.reshape(-1).to(torch.float64 if t.dtype == torch.float64 else torch.float32) for t in sums + squares])
        flat = torch.cat([flat, flat.new_tensor([float(batch)])])
        dist.all_reduce(flat)
        offset = 0
        for t in sums + squares:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n
        return int(round(flat[-1].item())), dist.get_world_size()


def _shared_squares(p: nn.Parameter, found: List[Tuple[LayerCall, str]], batch: int) -> Tensor:
    """``Σ_k ∇ℓ_k²`` of a parameter used by several calls: their per-example gradients summed before
    squaring, a chunk of examples at a time (about ``_CHUNK_ELEMENTS`` elements)."""
    dtype = found[0][0].cache["dtype"]
    s2 = torch.zeros(p.shape, dtype=dtype, device=p.device)
    chunk = max(1, per_example._CHUNK_ELEMENTS // max(1, p.numel()))
    for start in range(0, batch, chunk):
        rows = slice(start, min(start + chunk, batch))
        g = None
        for call, name in found:
            part = call.rule.per_example(call, name, rows)
            g = part if g is None else g.add_(part)
        per_example._accumulate_(s2, g)
    return s2


def _data_gradient_keeper(data: Dict[str, Tensor], edges: List[Tuple[int, str]]):
    """A node hook keeping the gradients the node sends into parameters (``edges``: (input index,
    parameter name)) in ``data``, summed over the node's uses of a parameter."""

    def hook(grad_inputs, grad_outputs):
        for index, name in edges:
            grad = grad_inputs[index]
            if grad is not None:
                grad = grad.detach()
                data[name] = grad if name not in data else data[name] + grad

    return hook
