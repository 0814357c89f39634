"""Mini-batch gradient variance from per-example gradients, in one backward pass (paper §4.1).

The mini-batch estimate of "Dissecting Adam" (Balles & Hennig 2018, §4.1; docs/algorithm.md
§1.1) replaces the moving-average variance estimate by one computed *within* a mini-batch of
B examples from the per-example gradients ∇ℓ_k of the data term of the loss. Per parameter
coordinate::

    ḡ   = (1/B) Σ_k ∇ℓ_k                               (the data term's mean gradient)
    σ̂²  = [ (1/B) Σ_k ∇ℓ_k²  −  ḡ² ] / (B − 1)

σ̂² is the unbiased estimate of var[ḡ], the variance of the *mini-batch mean* gradient (the
``g`` every optimizer of the family receives), for B examples drawn i.i.d.: the bracket times
B/(B−1) is the unbiased sample variance of one example's gradient, and var[ḡ] is that over B.

Mechanism: forward hooks store each supported layer's input, tensor hooks store the gradient
of its output; after the (single) backward pass the per-example gradients are formed layer by
layer, squared and summed. Nothing is computed B times:

* ``nn.Linear`` on ``[B, in]``: Σ_k (e_k a_kᵀ)² = (e²)ᵀ(a²) — no per-example tensor at all.
  On ``[B, T, in]`` (weight shared over T) the per-example gradient ``e_kᵀ a_k`` is formed by
  one batched matmul.
* ``nn.Conv2d`` (groups 1, zero padding): per-example gradient ``e_k · patches(a_k)ᵀ`` by
  batched matmuls over chunks of examples (the patches read through a strided view of the
  padded input).
* ``nn.Embedding``: per-example gradient by one ``scatter_add`` into ``[B, V, D]``.
* LSTM layers with the fused-layer protocol (below): the layer's output holds every h_t, so
  the gate pre-activations of all steps come from two matmuls; a hand-written backward
  through time (the cell recursion only, no autograd) from the saved output gradients gives
  the gate pre-activation gradients of every example and time step at once (rows never mix
  in an LSTM); per-example gradients follow by batched matmuls.

The per-example gradients of convolutions, LSTM layers and linear layers on sequences are
squared and summed chunk by chunk while they are still in cache
(``_per_example_product_moments``): no tensor of B × the layer's parameters is formed
(the embedding's ``[B, V, D]`` is the exception).

Only the data term is seen: the hooks see the gradient that flows through the layers, never
the gradient of a term added to the loss directly from the weights (an L2 term), which is
deterministic and carries no variance. ḡ is therefore the data term's mean gradient, *not*
``p.grad`` (σ̂² is shift-invariant only as a whole; its two parts need the same ḡ).

**Contract.**

* The loss is ``(1/B) Σ_k ℓ_k + R(θ)`` with R deterministic (``loss_reduction="mean"``, the
  default), or ``Σ_k ℓ_k + R(θ)`` (``loss_reduction="sum"``). Example k is row k of dim 0 of
  every supported layer's input; for a per-character loss averaged over B×T positions, ℓ_k is
  row k's mean over T (still a mean over the B rows).
* One forward and one backward per estimate. A supported layer called twice in one recorded
  step (weight sharing, gradient accumulation) is refused.
* Output: after :meth:`BatchVarianceEstimator.compute` every tracked parameter ``p`` has
  ``p.grad_batch_variance`` (σ̂², same shape, dtype and device as ``p``) and
  ``p.grad_batch_mean`` (ḡ of the data term); ``compute`` also returns ``{p: σ̂²}``.
  :meth:`BatchVarianceEstimator.record` sets both attributes to ``None`` on entry, so an
  optimizer that finds ``None`` knows no estimate exists for this step (never a stale one).
  :attr:`BatchVarianceEstimator.batch_size` holds the (global) B of the last estimate.
* Distributed (``torch.distributed`` initialised, world > 1): Σ_k ∇ℓ_k², Σ_k ∇ℓ_k and B are
  summed over ranks in one all-reduce (twice the gradient size) before σ̂² is formed — a
  per-rank variance is never averaged — so W processes with B/W examples each give the
  one-process estimate for the global batch. Each rank's loss must be the mean over *its* rows
  (what DDP does).
* Precision: the sums are formed in float32 (float64 if the parameter is float64). bfloat16
  autocast is supported (captured tensors are upcast). float16 gradients are refused: they
  come with a loss scaler whose scale would enter Σ∇ℓ² squared.

Refused with a one-line ``ValueError`` / ``RuntimeError`` (never a silent wrong number):
BatchNorm in training mode (it mixes the examples of a batch), a trainable parameter of a
layer type without a per-example rule, a layer called twice per step, grouped or non-zero-
padded convolutions, ``Embedding(max_norm/scale_grad_by_freq/sparse)``, ``nn.LSTM``/``nn.GRU``
(multi-layer fused modules: use one module per layer with the protocol below), B < 2,
float16 gradients.

**Fused LSTM layer protocol.** A module that owns exactly the trainable parameters
``weight_ih [4H, in]``, ``weight_hh [4H, H]`` and ``bias [4H]`` (optional constant buffer
``forget_bias_hh [4H]`` added to the pre-activations), is called as
``layer(x [B, T, in], (h0, c0) [1, B, H])`` and returns ``(out [B, T, H], (h, c))`` computing
PyTorch's LSTM (gate order i, f, g, o), is treated as one LSTM layer. Dropout between layers
is outside the layer, so the saved input is the dropped-out one and the per-example gradient
is exact for the mask actually drawn.

Use::

    est = BatchVarianceEstimator(model)
    with est.record():
        loss = criterion(model(x), y) + l2_term
        loss.backward()
    variances = est.compute()         # also p.grad_batch_variance for each parameter
    est.close()                        # removes the forward hooks

Lightning: :class:`lightning_msvag.batch_variance_callback.BatchVarianceCallback`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BatchVarianceEstimator", "BatchVarianceError", "batch_variance_from_moments"]

# Elements of the per-example tensors formed at once (float32: 4 MB). Squaring and summing
# them while they are still in cache, instead of one batch-sized tensor, halves the cost of
# the convolution and LSTM layers (benchmarks/batch_variance_cost.py).
_CHUNK_ELEMENTS = 1 << 20


class _Im2Col:
    """``rows ↦ [len(rows), L, in·kh·kw]``: the convolution's input patches of those examples.

    The patches are read through a strided view of the zero-padded input and copied once into
    ``[rows, in·kh·kw, L]`` (the weight's column order), which is about twice as fast on CPU
    as ``F.unfold`` (benchmarks/batch_variance_cost.py); the transpose is free for ``bmm``.
    """

    def __init__(self, a: Tensor, kernel: tuple[int, int], padding: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]) -> None:
        (ph, pw), (kh, kw), (sh, sw), (dh, dw) = padding, kernel, stride, dilation
        self.padded = F.pad(a, (pw, pw, ph, ph)).contiguous()
        height, width = self.padded.shape[2:]
        self.out_hw = ((height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1)
        self.kernel, self.stride, self.dilation = (kh, kw), (sh, sw), (dh, dw)

    def __call__(self, rows: slice) -> Tensor:
        part = self.padded[rows]
        n, channels = part.shape[:2]
        s_n, s_c, s_h, s_w = part.stride()
        (kh, kw), (sh, sw), (dh, dw), (oh, ow) = self.kernel, self.stride, self.dilation, self.out_hw
        view = part.as_strided((n, channels, kh, kw, oh, ow), (s_n, s_c, dh * s_h, dw * s_w, sh * s_h, sw * s_w))
        return view.reshape(n, channels * kh * kw, oh * ow).transpose(1, 2)


def _per_example_product_moments(left: Tensor, right_rows: Callable[[slice], Tensor], width: int) -> tuple[Tensor, Tensor]:
    """``(Σ_k G_k, Σ_k G_k²)`` for the per-example products ``G_k = left[k] @ right_rows(k)``.

    ``left`` is ``[B, out, L]``; ``right_rows(rows)`` gives ``[len(rows), L, width]``. Examples
    are taken in chunks of about ``_CHUNK_ELEMENTS`` elements of G and of the right factor.
    """
    batch, out, inner = left.shape
    s1 = left.new_zeros(out, width)
    s2 = left.new_zeros(out, width)
    chunk = max(1, _CHUNK_ELEMENTS // (width * max(out, inner)))
    for start in range(0, batch, chunk):
        rows = slice(start, start + chunk)
        g = torch.bmm(left[rows], right_rows(rows))  # [chunk, out, width]
        s1 += g.sum(0)
        s2 += g.square_().sum(0)
    return s1, s2

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class BatchVarianceError(ValueError):
    """A model, loss or step the mini-batch variance estimate cannot handle exactly."""


def batch_variance_from_moments(sum_grad: Tensor, sum_sq: Tensor, batch_size: int) -> Tensor:
    """σ̂² = [(1/B) Σ∇ℓ_k² − ḡ²] / (B − 1) with ḡ = (1/B) Σ∇ℓ_k (paper §4.1).

    Clamped at 0: the bracket is a sum of squares about the mean and only round-off can make
    it negative.
    """
    return _moments_to_variance_(sum_grad.clone(), sum_sq.clone(), batch_size)[1]


def _moments_to_variance_(sum_grad: Tensor, sum_sq: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """``(ḡ, σ̂²)`` of :func:`batch_variance_from_moments`, overwriting ``sum_grad`` with ḡ and
    ``sum_sq`` with σ̂² (three passes over the largest layer instead of six)."""
    if batch_size < 2:
        raise BatchVarianceError(f"the mini-batch variance needs at least 2 examples, got B = {batch_size}")
    mean = sum_grad.div_(batch_size)
    return mean, sum_sq.div_(batch_size).addcmul_(mean, mean, value=-1).div_(batch_size - 1).clamp_min_(0.0)


def _is_lstm_layer(module: nn.Module) -> bool:
    names = {n for n, _ in module.named_parameters(recurse=False)}
    if names != {"weight_ih", "weight_hh", "bias"}:
        return False
    w_ih, w_hh = module.weight_ih, module.weight_hh
    hidden = w_hh.shape[1]
    return w_ih.dim() == 2 and w_hh.shape == (4 * hidden, hidden) and w_ih.shape[0] == 4 * hidden


class _Record:
    """What one module saw in the recorded step."""

    __slots__ = ("inputs", "grads", "calls")

    def __init__(self) -> None:
        self.inputs: Any = None
        self.grads: dict[int, Tensor] = {}
        self.calls = 0


class BatchVarianceEstimator:
    """Per-coordinate mini-batch variance σ̂² of the data term's mean gradient (see module docstring).

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
        self.batch_size: int | None = None
        self._modules: list[nn.Module] = []
        self._kinds: dict[nn.Module, str] = {}
        self._batchnorms: list[nn.Module] = []
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            kind = self._kind(module, name, bool(own))
            if kind == "batchnorm":
                self._batchnorms.append(module)
            elif kind is not None:
                self._modules.append(module)
                self._kinds[module] = kind
        self._records: dict[nn.Module, _Record] = {}
        self._armed = False
        self._handles = [m.register_forward_hook(self._forward_hook) for m in self._modules]

    # ----------------------------------------------------------------- setup
    @staticmethod
    def _kind(module: nn.Module, name: str, trainable: bool) -> str | None:
        label = f"{name or 'model'} ({type(module).__name__})"
        if isinstance(module, (nn.LSTM, nn.GRU, nn.RNN)):
            raise BatchVarianceError(
                f"{label}: fused multi-step RNN modules are not supported; use one layer module per layer "
                "(weight_ih, weight_hh, bias; see lightning_msvag.batch_variance)"
            )
        if isinstance(module, _BATCHNORM):
            # Even without affine parameters, batch statistics couple the examples upstream.
            return "batchnorm"  # refused at start() if training, and if it has trainable parameters
        if not trainable:
            return None
        for base in (nn.Linear, nn.Conv2d, nn.Embedding):
            if isinstance(module, base) and type(module).forward is not base.forward:
                # The hooks see the forward's input, which a custom forward may transform (e.g. pad) first.
                raise BatchVarianceError(f"{label} overrides {base.__name__}.forward: no per-example gradient rule")
        if isinstance(module, nn.Linear):
            return "linear"
        if isinstance(module, nn.Conv2d):
            if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str) and module.padding != "valid":
                raise BatchVarianceError(f"{label}: only groups=1, zero-padded convolutions with integer padding are supported")
            return "conv2d"
        if isinstance(module, nn.Embedding):
            if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
                raise BatchVarianceError(f"{label}: Embedding with max_norm, scale_grad_by_freq or sparse is not supported")
            return "embedding"
        if _is_lstm_layer(module):
            return "lstm"
        raise BatchVarianceError(f"{label} has trainable parameters but no per-example gradient rule")

    def parameters(self) -> Iterator[nn.Parameter]:
        """The tracked (trainable) parameters, in module order."""
        for module in self._modules:
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    yield p

    def close(self) -> None:
        """Remove the forward hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------- recording
    def start(self) -> None:
        """Arm the hooks for one forward + backward; clears the previous estimate."""
        if not self._handles:
            raise RuntimeError("BatchVarianceEstimator is closed")
        for module in self._batchnorms:
            if module.training:
                raise BatchVarianceError(
                    f"{type(module).__name__} in training mode mixes the examples of a batch: no per-example gradients"
                )
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                raise BatchVarianceError(f"{type(module).__name__} (eval mode) has no per-example gradient rule; freeze its parameters")
        for p in self.parameters():
            p.grad_batch_variance = None
            p.grad_batch_mean = None
        self._records = {m: _Record() for m in self._modules}
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

    def _forward_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._armed or not torch.is_grad_enabled():
            return
        rec = self._records[module]
        rec.calls += 1
        if rec.calls > 1:
            raise BatchVarianceError(
                f"{type(module).__name__} called {rec.calls} times in one recorded step (weight sharing or gradient "
                "accumulation): the mini-batch variance needs one forward and one backward per estimate"
            )
        if self._kinds[module] == "lstm":
            rec.inputs = (args[0].detach(), tuple(s.detach() for s in args[1]), output[0].detach())
            outs = (output[0], output[1][0], output[1][1])
        else:
            rec.inputs = args[0].detach()
            outs = (output,)
        for i, out in enumerate(outs):
            if out.requires_grad:
                out.register_hook(self._grad_saver(rec, i))

    @staticmethod
    def _grad_saver(rec: _Record, index: int):
        def hook(grad: Tensor) -> None:
            if grad.dtype == torch.float16:
                raise BatchVarianceError(
                    "float16 gradients (16-mixed with a loss scaler) are not supported by the mini-batch variance; use bf16 or 32-bit"
                )
            rec.grads[index] = grad.detach()

        return hook

    # ------------------------------------------------------------ per-layer
    def _moments(self, module: nn.Module, rec: _Record, dtype: torch.dtype) -> tuple[int, list[tuple[Tensor, Tensor]]]:
        """``(B, [(Σ_k ∇ℓ_k, Σ_k ∇ℓ_k²) per own trainable parameter])`` for one module."""
        kind = self._kinds[module]
        if kind == "lstm":
            return self._lstm_moments(module, rec, dtype)
        a = rec.inputs.to(dtype) if kind != "embedding" else rec.inputs
        batch = a.shape[0]
        e = rec.grads.get(0)
        if e is None:  # no gradient reached this layer: every per-example gradient is 0
            zeros = [(torch.zeros_like(p, dtype=dtype), torch.zeros_like(p, dtype=dtype)) for p in module.parameters(recurse=False)]
            return batch, zeros
        # ∇ℓ_k = scale · (row k's part of the batch gradient): the mean's 1/B undone.
        e = e.to(dtype) * (batch if self.loss_reduction == "mean" else 1)
        per_param: dict[str, tuple[Tensor, Tensor]] = {}
        if kind == "linear":
            if a.dim() == 2:
                per_param["weight"] = (e.t() @ a, e.square().t() @ a.square())
                if module.bias is not None:
                    per_param["bias"] = (e.sum(0), e.square().sum(0))
            else:
                a3, e3 = a.reshape(batch, -1, a.shape[-1]), e.reshape(batch, -1, e.shape[-1])
                per_param["weight"] = _per_example_product_moments(e3.transpose(1, 2), lambda rows: a3[rows], a3.shape[-1])
                if module.bias is not None:
                    gb = e3.sum(1)
                    per_param["bias"] = (gb.sum(0), gb.square().sum(0))
        elif kind == "conv2d":
            padding = (0, 0) if module.padding == "valid" else module.padding
            e3 = e.flatten(2)  # [B, out, L]

            unfolded = _Im2Col(a, module.kernel_size, padding, module.stride, module.dilation)
            s1, s2 = _per_example_product_moments(e3, unfolded, module.weight[0].numel())
            per_param["weight"] = (s1.view_as(module.weight), s2.view_as(module.weight))
            if module.bias is not None:
                gb = e3.sum(2)
                per_param["bias"] = (gb.sum(0), gb.square().sum(0))
        elif kind == "embedding":
            idx = a.reshape(batch, -1)
            e3 = e.reshape(batch, idx.shape[1], -1)
            if module.padding_idx is not None:
                e3 = e3 * (idx != module.padding_idx).unsqueeze(-1).to(dtype)
            g = torch.zeros(batch, module.num_embeddings, e3.shape[-1], dtype=dtype, device=e3.device)
            g.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, e3.shape[-1]), e3)
            per_param["weight"] = (g.sum(0), g.square().sum(0))
        return batch, [per_param[n] for n, p in module.named_parameters(recurse=False) if p.requires_grad]

    def _lstm_moments(self, module: nn.Module, rec: _Record, dtype: torch.dtype) -> tuple[int, list[tuple[Tensor, Tensor]]]:
        x, (h0, c0), out = rec.inputs
        batch, steps = x.shape[0], x.shape[1]
        hidden = module.weight_hh.shape[1]
        grad_out, grad_h, grad_c = (rec.grads.get(i) for i in range(3))
        if grad_out is None and grad_h is None and grad_c is None:
            zeros = [(torch.zeros_like(p, dtype=dtype), torch.zeros_like(p, dtype=dtype)) for p in module.parameters(recurse=False)]
            return batch, zeros
        w_ih, w_hh = module.weight_ih.detach().to(dtype), module.weight_hh.detach().to(dtype)
        bias = module.bias.detach().to(dtype)
        extra = getattr(module, "forget_bias_hh", None)
        if extra is not None:
            bias = bias + extra.to(dtype)
        x, out = x.to(dtype), out.to(dtype)
        # The layer's outputs are h_1..h_T, so every h_{t-1} is known and all gate
        # pre-activations z_t (PyTorch gate order i, f, g, o) come from two matmuls; only
        # c_t = f_t c_{t-1} + i_t g_t and the backward recursion run over t. Rows never mix in
        # an LSTM, so dℓ/dz_t of the batch loss holds every example's own gradient in its row.
        h_prev = torch.cat([h0[0].to(dtype).unsqueeze(1), out[:, :-1]], 1)  # [B, T, H]
        # Time-major from here: the recursions below take contiguous [B, ·] slices per step.
        inputs = torch.cat([x, h_prev], 2)  # [B, T, in + H]: both weights' right factors at once
        z = (inputs @ torch.cat([w_ih, w_hh], 1).t() + bias).transpose(0, 1).contiguous()  # [T, B, 4H]
        gates = z.view(steps, batch, 4, hidden)
        i_g, f_g, o_g = gates[:, :, 0].sigmoid(), gates[:, :, 1].sigmoid(), gates[:, :, 3].sigmoid()
        g_g = gates[:, :, 2].tanh()
        c = c0[0].to(dtype)
        cs = [c]
        for ig_t, f_t in zip((i_g * g_g).unbind(0), f_g.unbind(0)):
            c = torch.addcmul(ig_t, f_t, c)
            cs.append(c)
        c_all = torch.stack(cs)  # [T + 1, B, H]: c_0 .. c_T
        c_prev, tanh_c = c_all[:-1], c_all[1:].tanh()
        # dz_t = [dc·g·i(1−i), dc·c_{t−1}·f(1−f), dc·i·(1−g²), dh·tanh(c_t)·o(1−o)], with
        # dh_t = dℓ/dout_t + dz_{t+1} W_hh and dc_t = dh_t·o_t·(1 − tanh²c_t) + dc_{t+1}·f_{t+1}.
        from_c = torch.stack([g_g * i_g * (1 - i_g), c_prev * f_g * (1 - f_g), i_g * (1 - g_g.square())], 2)  # [T, B, 3, H]
        from_h = tanh_c * o_g * (1 - o_g)
        dh_to_dc = o_g * (1 - tanh_c.square())
        dz = torch.empty(steps, batch, 4, hidden, dtype=dtype, device=x.device)
        dh_next = grad_h[0].to(dtype) if grad_h is not None else torch.zeros_like(c)
        dc_next = grad_c[0].to(dtype) if grad_c is not None else torch.zeros_like(c)
        grad_out = grad_out.to(dtype).transpose(0, 1).unbind(0) if grad_out is not None else None
        for t in range(steps - 1, -1, -1):
            dh = dh_next if grad_out is None else dh_next + grad_out[t]
            dc = torch.addcmul(dc_next, dh, dh_to_dc[t])
            torch.mul(from_c[t], dc.unsqueeze(1), out=dz[t, :, :3])
            torch.mul(from_h[t], dh, out=dz[t, :, 3])
            if t:
                dh_next = dz[t].view(batch, 4 * hidden) @ w_hh
                dc_next = dc * f_g[t]
        dz = dz.view(steps, batch, 4 * hidden).transpose(0, 1)  # [B, T, 4H]
        dz *= batch if self.loss_reduction == "mean" else 1
        dz_t = dz.transpose(1, 2)
        bias_grads = dz.sum(1)
        s1, s2 = _per_example_product_moments(dz_t, lambda rows: inputs[rows], inputs.shape[-1])
        width = x.shape[-1]
        per_param = {
            "weight_ih": (s1[:, :width].contiguous(), s2[:, :width].contiguous()),
            "weight_hh": (s1[:, width:].contiguous(), s2[:, width:].contiguous()),
            "bias": (bias_grads.sum(0), bias_grads.square().sum(0)),
        }
        return batch, [per_param[n] for n, p in module.named_parameters(recurse=False) if p.requires_grad]

    # ---------------------------------------------------------------- result
    def compute(self) -> dict[nn.Parameter, Tensor]:
        """Form σ̂² for every tracked parameter from the recorded step; sets ``p.grad_batch_variance``/``p.grad_batch_mean``."""
        if self._armed:
            self.stop()
        params: list[nn.Parameter] = []
        sums: list[Tensor] = []
        squares: list[Tensor] = []
        batch: int | None = None
        for module in self._modules:
            rec = self._records.get(module)
            if rec is None or rec.calls == 0:
                raise BatchVarianceError(f"{type(module).__name__} was not called in the recorded step: nothing to estimate from")
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            dtype = torch.float64 if own[0].dtype == torch.float64 else torch.float32
            b, moments = self._moments(module, rec, dtype)
            if batch is None:
                batch = b
            elif b != batch:
                raise BatchVarianceError(f"layers saw different batch sizes ({batch} and {b}): dim 0 must be the example dimension")
            for p, (s1, s2) in zip(own, moments):
                params.append(p)
                sums.append(s1)
                squares.append(s2)
        self._records = {}
        if batch is None:
            raise BatchVarianceError("no supported layer with trainable parameters")
        batch = self._all_reduce(sums, squares, batch)
        self.batch_size = batch
        result: dict[nn.Parameter, Tensor] = {}
        for p, s1, s2 in zip(params, sums, squares):
            mean, var = _moments_to_variance_(s1, s2, batch)  # the sums are this step's own
            p.grad_batch_variance = var.to(p.dtype)
            p.grad_batch_mean = mean.to(p.dtype)
            result[p] = p.grad_batch_variance
        return result

    def _all_reduce(self, sums: list[Tensor], squares: list[Tensor], batch: int) -> int:
        dist = torch.distributed
        if not (self.sync_distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return batch
        # One flat buffer [Σ∇ℓ, Σ∇ℓ², B]: sums, never per-rank variances, are what add up.
        flat = torch.cat([t.reshape(-1).to(torch.float64 if t.dtype == torch.float64 else torch.float32) for t in sums + squares])
        flat = torch.cat([flat, flat.new_tensor([float(batch)])])
        dist.all_reduce(flat)
        offset = 0
        for t in sums + squares:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n
        return int(round(flat[-1].item()))
