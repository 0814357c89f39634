"""Per-example gradients of the layers the mini-batch variance estimate supports (docs/algorithm.md §1.1).

A rule turns one recorded call of a layer (its saved input ``a`` and the gradient ``e`` of the
batch loss with respect to its output) into per-example statistics of the gradients of the
layer's own parameters, without B backward passes. Example k is row k of dim 0 of the layer's
input and output. Row k's part of the batch gradient is example k's own gradient ∇ℓ_k up to
one factor for all rows (B for a loss that is a mean over the batch, 1 for a sum), which the
estimator applies to the sums: the rules work on the gradients as the backward pass left them.

Two forms per rule:

* :meth:`LayerRule.squares`: ``Σ_k ∇ℓ_k²`` of each parameter, for a parameter that this call
  alone uses (the fast path: ``nn.Linear`` on ``[B, in]`` needs no per-example tensor at all,
  Σ_k (e_k a_kᵀ)² = (e²)ᵀ(a²)). (``Σ_k ∇ℓ_k`` is the gradient autograd already sent through the
  call to the parameter, which the estimator takes from the backward pass itself.);
* :meth:`LayerRule.per_example`: the per-example gradients ``[n, *shape]`` of a chunk of rows,
  for a parameter used by several calls (a weight shared by two layers, a tied embedding and
  output layer, a layer called twice): the estimator sums the calls' per-example gradients
  before squaring, since (∇ℓ_k⁽¹⁾ + ∇ℓ_k⁽²⁾)² is not ∇ℓ_k⁽¹⁾² + ∇ℓ_k⁽²⁾².

The rules:

* ``nn.Linear`` on ``[B, …, in]``: ∇ℓ_k = e_kᵀ a_k over the positions of row k (one batched
  matmul; on ``[B, in]`` the product of squares above).
* ``nn.Conv2d`` (groups 1, zero padding): ∇ℓ_k = e_k · patches(a_k)ᵀ by batched matmuls, the
  patches read through a strided view of the padded input, a chunk of examples at a time.
* ``nn.Embedding``: ∇ℓ_k by a ``scatter_add`` of row k's output gradients into the rows of
  its indices.
* LSTM layers with the fused-layer protocol (:class:`LSTMLayerRule`): a hand-written backward
  through time of the cell recursion from the saved output gradients gives every row's gate
  pre-activation gradients (rows never mix in an LSTM); per-example gradients follow by
  batched matmuls.

Per-example matrices are squared and summed chunk by chunk while they are still in cache
(:func:`_per_example_product_squares`): no tensor of B × a layer's parameters is formed (the
embedding's ``[B, V, D]`` excepted).

This module needs only torch; :mod:`lightning_msvag.batch_variance` records the calls and
combines the rules.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LayerCall", "LayerRule", "RULES", "UnsupportedLayer", "rule_for_module"]

# Elements of the per-example tensors formed at once (float32: 4 MB). Squaring and summing
# them while they are still in cache, instead of one batch-sized tensor, halves the cost of
# the convolution and LSTM layers (benchmarks/batch_variance_cost.py).
_CHUNK_ELEMENTS = 1 << 20


class UnsupportedLayer(ValueError):
    """A layer whose trainable parameters have no per-example rule (the message says why)."""


class LayerCall:
    """One call of a supported layer in the recorded step: its inputs, its outputs' gradients.

    ``outputs[i]`` are the tensors whose gradients the rule needs and ``in_nodes``/``out_nodes``
    the autograd nodes that bound the call: the estimator hooks and walks them as the call
    happens, then :meth:`release_graph` drops them (a hook on an output that holds the record
    would otherwise keep each step's graph alive). ``grads[i]`` is the gradient of output ``i``
    (absent: none reached it); ``out_meta[i]`` its shape, dtype and device. ``prepare`` converts
    them once to the compute dtype.
    """

    __slots__ = ("module", "rule", "inputs", "outputs", "out_meta", "grads", "batch", "in_nodes", "out_nodes", "cache")

    def __init__(self, module: nn.Module, rule: "LayerRule", inputs: Any, outputs: Sequence[Tensor],
                 in_tensors: Sequence[Tensor], batch: Optional[int] = None) -> None:
        self.module = module
        self.rule = rule
        self.inputs = inputs
        self.outputs = list(outputs)
        self.out_meta = [(t.shape, t.dtype, t.device) for t in outputs]
        self.grads: Dict[int, Tensor] = {}
        self.batch = int(outputs[0].shape[0]) if batch is None else int(batch)
        # the autograd nodes that bound this call (docs/algorithm.md §1.1: uses outside a layer)
        self.out_nodes = [t.grad_fn for t in outputs if t.grad_fn is not None]
        self.in_nodes = [t.grad_fn for t in in_tensors if isinstance(t, Tensor) and t.grad_fn is not None]
        self.cache: Dict[str, Any] = {}

    def release_graph(self) -> None:
        """Drop the references into the step's autograd graph (the outputs and the bounding nodes)."""
        self.outputs, self.out_nodes, self.in_nodes = [], [], []

    @property
    def reached(self) -> bool:
        """Some gradient of the loss reached this call's outputs."""
        return bool(self.grads)


def _own(module: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]


class LayerRule:
    """What a rule implements (one subclass per layer type, registered in :data:`RULES`)."""

    #: the layer types a rule's :meth:`accepts` is asked about
    types: Tuple[type, ...] = ()

    def accepts(self, module: nn.Module, label: str) -> bool:
        """Whether this rule steps ``module``'s parameters; :class:`UnsupportedLayer` for a variant
        of its layer type it cannot handle exactly (:meth:`refuse_variants`)."""
        if not isinstance(module, self.types):
            return False
        self.refuse_variants(module, label)
        return True

    def refuse_variants(self, module: nn.Module, label: str) -> None:
        """Raise :class:`UnsupportedLayer` for a configuration of the layer the rule does not cover."""

    def parameters(self, module: nn.Module) -> List[Tuple[str, nn.Parameter]]:
        """The trainable parameters the rule gives per-example gradients of (by default the
        module's own), with their names relative to ``module``."""
        return _own(module)

    def capture(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> LayerCall:
        """The call record of one forward (inputs detached); its ``outputs`` get gradient hooks."""
        a = args[0]
        return LayerCall(module, self, a.detach(), [output], [a])

    def prepare(self, call: LayerCall, dtype: torch.dtype) -> None:
        """Convert the saved tensors and the output gradients to ``dtype`` (once)."""
        if "prepared" in call.cache:
            return
        if call.inputs.is_floating_point():
            call.inputs = call.inputs.to(dtype)
        call.grads = {i: g.to(dtype) for i, g in call.grads.items()}
        call.cache["prepared"], call.cache["dtype"] = True, dtype

    def squares(self, call: LayerCall, names: Sequence[str]) -> Dict[str, Tensor]:
        """``{name: Σ_k ∇ℓ_k²}`` of the parameters ``names`` (used by this call alone)."""
        if not call.reached:  # no gradient reached the layer: every per-example gradient is 0
            params = dict(self.parameters(call.module))
            return {n: torch.zeros_like(params[n], dtype=call.cache["dtype"]) for n in names}
        return self._squares(call, names)

    def per_example(self, call: LayerCall, name: str, rows: slice) -> Tensor:
        """The per-example gradients ``[len(rows), *shape]`` of parameter ``name`` for the examples ``rows``."""
        if not call.reached:
            p = dict(self.parameters(call.module))[name]
            n = len(range(*rows.indices(call.batch)))
            return torch.zeros((n, *p.shape), dtype=call.cache["dtype"], device=p.device)
        return self._per_example(call, name, rows)

    def _squares(self, call: LayerCall, names: Sequence[str]) -> Dict[str, Tensor]:
        raise NotImplementedError

    def _per_example(self, call: LayerCall, name: str, rows: slice) -> Tensor:
        raise NotImplementedError


# ------------------------------------------------------------------ helpers
class _Im2Col:
    """``rows ↦ [len(rows), L, in·kh·kw]``: the convolution's input patches of those examples.

    The patches are read through a strided view of the zero-padded input and copied once into
    ``[rows, in·kh·kw, L]`` (the weight's column order), which is about twice as fast on CPU
    as ``F.unfold`` (benchmarks/batch_variance_cost.py); the transpose is free for ``bmm``.
    """

    def __init__(self, a: Tensor, kernel: Tuple[int, int], padding: Tuple[int, int], stride: Tuple[int, int], dilation: Tuple[int, int]) -> None:
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


def _per_example_product_squares(left: Tensor, right_rows: Callable[[slice], Tensor], width: int) -> Tensor:
    """``Σ_k G_k²`` for the per-example products ``G_k = left[k] @ right_rows(k)``.

    ``left`` is ``[B, out, L]``; ``right_rows(rows)`` gives ``[len(rows), L, width]``. Examples
    are taken in chunks of about ``_CHUNK_ELEMENTS`` elements of G and of the right factor.
    """
    batch, out, inner = left.shape
    s2 = left.new_zeros(out, width)
    chunk = max(1, _CHUNK_ELEMENTS // (width * max(out, inner)))
    for start in range(0, batch, chunk):
        rows = slice(start, start + chunk)
        _accumulate_(s2, torch.bmm(left[rows], right_rows(rows)))  # [chunk, out, width]
    return s2


def _accumulate_(s2: Tensor, per_example: Tensor) -> None:
    """``s2 += Σ_k g_k²`` over dim 0 of ``per_example``: example by example, each g_k read once while
    in cache by a fused multiply-add (3× faster on CPU than squaring the chunk and reducing it)."""
    for g in per_example.unbind(0):
        s2.addcmul_(g, g)


def _row_squares(per_example: Tensor) -> Tensor:
    """``Σ_k x_k²`` over dim 0."""
    return per_example.square().sum(0)


# ------------------------------------------------------------------ the rules
class LinearRule(LayerRule):
    """``nn.Linear`` on ``[B, in]`` or ``[B, …, in]`` (the weight shared over the positions of a row)."""

    types = (nn.Linear,)

    def _sequences(self, call: LayerCall) -> Tuple[Tensor, Tensor]:
        a, e = call.inputs, call.grads[0]
        return a.reshape(call.batch, -1, a.shape[-1]), e.reshape(call.batch, -1, e.shape[-1])

    def _squares(self, call, names):
        a, e = call.inputs, call.grads[0]
        out = {}
        if a.dim() == 2:
            if "weight" in names:
                out["weight"] = e.square().t() @ a.square()
            if "bias" in names:
                out["bias"] = _row_squares(e)
            return out
        a3, e3 = self._sequences(call)
        if "weight" in names:
            out["weight"] = _per_example_product_squares(e3.transpose(1, 2), lambda rows: a3[rows], a3.shape[-1])
        if "bias" in names:
            out["bias"] = _row_squares(e3.sum(1))
        return out

    def _per_example(self, call, name, rows):
        a3, e3 = self._sequences(call)
        if name == "weight":
            return torch.bmm(e3[rows].transpose(1, 2), a3[rows])
        return e3[rows].sum(1)


class Conv2dRule(LayerRule):
    """``nn.Conv2d`` with groups 1 and zero padding."""

    types = (nn.Conv2d,)

    def accepts(self, module, label):
        # other groupings and paddings take the general rule (FunctionalRule)
        return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
                and (not isinstance(module.padding, str) or module.padding == "valid"))

    def _parts(self, call: LayerCall):
        if "im2col" not in call.cache:
            module = call.module
            padding = (0, 0) if module.padding == "valid" else module.padding
            call.cache["im2col"] = _Im2Col(call.inputs, module.kernel_size, padding, module.stride, module.dilation)
        return call.grads[0].flatten(2), call.cache["im2col"]  # e: [B, out, L]

    def _squares(self, call, names):
        e3, patches = self._parts(call)
        weight = call.module.weight
        out = {}
        if "weight" in names:
            out["weight"] = _per_example_product_squares(e3, patches, weight[0].numel()).view_as(weight)
        if "bias" in names:
            out["bias"] = _row_squares(e3.sum(2))
        return out

    def _per_example(self, call, name, rows):
        e3, patches = self._parts(call)
        if name == "weight":
            g = torch.bmm(e3[rows], patches(rows))
            return g.view(g.shape[0], *call.module.weight.shape)
        return e3[rows].sum(2)


class EmbeddingRule(LayerRule):
    """``nn.Embedding`` (dense gradients, no ``max_norm``/``scale_grad_by_freq``)."""

    types = (nn.Embedding,)

    def refuse_variants(self, module, label):
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            raise UnsupportedLayer(f"{label}: Embedding with max_norm, scale_grad_by_freq or sparse is not supported")

    def _per_example(self, call, name, rows):
        module = call.module
        idx = call.inputs.reshape(call.batch, -1)[rows]
        e = call.grads[0]
        e3 = e.reshape(call.batch, idx.shape[1], -1)[rows]
        if module.padding_idx is not None:
            e3 = e3 * (idx != module.padding_idx).unsqueeze(-1).to(e3.dtype)
        g = torch.zeros(idx.shape[0], module.num_embeddings, e3.shape[-1], dtype=e3.dtype, device=e3.device)
        return g.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, e3.shape[-1]), e3)

    def _squares(self, call, names):
        return {"weight": _row_squares(self._per_example(call, "weight", slice(None)))}


def _is_lstm_layer(module: nn.Module) -> bool:
    names = {n for n, _ in module.named_parameters(recurse=False)}
    if names != {"weight_ih", "weight_hh", "bias"}:
        return False
    w_ih, w_hh = module.weight_ih, module.weight_hh
    hidden = w_hh.shape[1]
    return w_ih.dim() == 2 and w_hh.shape == (4 * hidden, hidden) and w_ih.shape[0] == 4 * hidden


class LSTMLayerRule(LayerRule):
    """One LSTM layer with the fused-layer protocol.

    A module that owns exactly the trainable parameters ``weight_ih [4H, in]``, ``weight_hh
    [4H, H]`` and ``bias [4H]`` (optional constant buffer ``forget_bias_hh [4H]`` added to the
    pre-activations), is called as ``layer(x [B, T, in], (h0, c0) [1, B, H])`` and returns
    ``(out [B, T, H], (h, c))`` computing PyTorch's LSTM (gate order i, f, g, o). Dropout
    between layers is outside the layer, so the saved input is the dropped-out one and the
    per-example gradient is exact for the mask actually drawn.
    """

    def accepts(self, module, label):
        return _is_lstm_layer(module)

    def capture(self, module, args, kwargs, output):
        x, state = args[0], args[1]
        inputs = (x.detach(), tuple(s.detach() for s in state), output[0].detach())
        return LayerCall(module, self, inputs, (output[0], output[1][0], output[1][1]), [x, *state])

    def prepare(self, call, dtype):
        if "prepared" in call.cache:
            return
        x, (h0, c0), out = call.inputs
        call.inputs = (x.to(dtype), (h0.to(dtype), c0.to(dtype)), out.to(dtype))
        call.grads = {i: g.to(dtype) for i, g in call.grads.items()}
        call.cache["prepared"], call.cache["dtype"] = True, dtype

    def _gate_gradients(self, call: LayerCall) -> Tuple[Tensor, Tensor]:
        """``(dz [B, T, 4H], inputs [B, T, in + H])``: every row's gate pre-activation gradients
        and the matching right factors [x_t, h_{t−1}] of both weights."""
        if "dz" in call.cache:
            return call.cache["dz"], call.cache["right"]
        module = call.module
        x, (h0, c0), out = call.inputs
        dtype = x.dtype
        batch, steps = x.shape[0], x.shape[1]
        hidden = module.weight_hh.shape[1]
        grad_out, grad_h, grad_c = (call.grads.get(i) for i in range(3))
        w_ih, w_hh = module.weight_ih.detach().to(dtype), module.weight_hh.detach().to(dtype)
        bias = module.bias.detach().to(dtype)
        extra = getattr(module, "forget_bias_hh", None)
        if extra is not None:
            bias = bias + extra.to(dtype)
        # The layer's outputs are h_1..h_T, so every h_{t-1} is known and all gate
        # pre-activations z_t (PyTorch gate order i, f, g, o) come from two matmuls; only
        # c_t = f_t c_{t-1} + i_t g_t and the backward recursion run over t. Rows never mix in
        # an LSTM, so dℓ/dz_t of the batch loss holds every example's own gradient in its row.
        h_prev = torch.cat([h0[0].unsqueeze(1), out[:, :-1]], 1)  # [B, T, H]
        # Time-major from here: the recursions below take contiguous [B, ·] slices per step.
        inputs = torch.cat([x, h_prev], 2)  # [B, T, in + H]: both weights' right factors at once
        z = (inputs @ torch.cat([w_ih, w_hh], 1).t() + bias).transpose(0, 1).contiguous()  # [T, B, 4H]
        gates = z.view(steps, batch, 4, hidden)
        i_g, f_g, o_g = gates[:, :, 0].sigmoid(), gates[:, :, 1].sigmoid(), gates[:, :, 3].sigmoid()
        g_g = gates[:, :, 2].tanh()
        c = c0[0]
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
        dh_next = grad_h[0] if grad_h is not None else torch.zeros_like(c)
        dc_next = grad_c[0] if grad_c is not None else torch.zeros_like(c)
        grad_out = grad_out.transpose(0, 1).unbind(0) if grad_out is not None else None
        for t in range(steps - 1, -1, -1):
            dh = dh_next if grad_out is None else dh_next + grad_out[t]
            dc = torch.addcmul(dc_next, dh, dh_to_dc[t])
            torch.mul(from_c[t], dc.unsqueeze(1), out=dz[t, :, :3])
            torch.mul(from_h[t], dh, out=dz[t, :, 3])
            if t:
                dh_next = dz[t].view(batch, 4 * hidden) @ w_hh
                dc_next = dc * f_g[t]
        dz = dz.view(steps, batch, 4 * hidden).transpose(0, 1)  # [B, T, 4H]
        call.cache["dz"], call.cache["right"] = dz, inputs
        return dz, inputs

    def _squares(self, call, names):
        dz, inputs = self._gate_gradients(call)
        width = call.inputs[0].shape[-1]
        out = {}
        if "weight_ih" in names or "weight_hh" in names:
            s2 = _per_example_product_squares(dz.transpose(1, 2), lambda rows: inputs[rows], inputs.shape[-1])
            out["weight_ih"], out["weight_hh"] = s2[:, :width].contiguous(), s2[:, width:].contiguous()
        if "bias" in names:
            out["bias"] = _row_squares(dz.sum(1))
        return {n: out[n] for n in names}

    def _per_example(self, call, name, rows):
        dz, inputs = self._gate_gradients(call)
        if name == "bias":
            return dz[rows].sum(1)
        width = call.inputs[0].shape[-1]
        g = torch.bmm(dz[rows].transpose(1, 2), inputs[rows])
        return (g[:, :, :width] if name == "weight_ih" else g[:, :, width:]).contiguous()


class _NormRule(LayerRule):
    """Elementwise-affine normalisation over the last dims (``LayerNorm``, ``RMSNorm``): with x̂ the
    normalised input (recomputed from the saved input), ∇ℓ_k of the weight is Σ over row k's
    positions of e ⊙ x̂, of the bias Σ e. No per-example matmul: elementwise work and a sum."""

    def _normalised(self, module: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _rows(self, call: LayerCall, name: str, rows: slice) -> Tensor:
        module = call.module
        dims = len(module.normalized_shape)
        e = call.grads[0][rows]
        if name == "weight":
            if "x_hat" not in call.cache:
                call.cache["x_hat"] = self._normalised(module, call.inputs)
            e = e * call.cache["x_hat"][rows]
        return e.reshape(e.shape[0], -1, *e.shape[e.dim() - dims:]).sum(1)

    def _squares(self, call, names):
        return {n: _row_squares(self._rows(call, n, slice(None))) for n in names}

    def _per_example(self, call, name, rows):
        return self._rows(call, name, rows)


class LayerNormRule(_NormRule):
    """``nn.LayerNorm`` with elementwise affine parameters."""

    types = (nn.LayerNorm,)

    def _normalised(self, module, x):
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)  # the fused kernel, without the affine part


class RMSNormRule(_NormRule):
    """``nn.RMSNorm``: x̂ = x / √(mean(x²) + ε) over the normalised dims."""

    types = (getattr(nn, "RMSNorm", ()),)

    def _normalised(self, module, x):
        return F.rms_norm(x, module.normalized_shape, eps=module.eps)


def _argument_names(module: nn.Module, paths) -> List[str]:
    """The forward argument each leaf of ``(args, kwargs)`` belongs to (by the flatten ``paths``)."""
    try:
        names = [n for n, p in inspect.signature(module.forward).parameters.items()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        names = []
    found = []
    for path in paths:
        where, key = path[0].idx, path[1]
        if where == 1:  # a keyword argument
            found.append(str(key.key))
        else:
            found.append(names[key.idx] if key.idx < len(names) else f"#{key.idx}")
    return found


def _example_dims(module: nn.Module, leaves: List[Any], names: List[str], out_leaves: List[Any]):
    """``(dim of each input leaf or None, dim of each output leaf, B)``: where each tensor holds the
    examples. Known layouts: RNN modules (``batch_first``; the states ``[layers, B, H]`` at dim 1)
    and ``nn.MultiheadAttention`` (``batch_first``; ``key_padding_mask [B, S]``; a 2-d ``attn_mask``
    shared by all examples); otherwise dim 0 of every tensor whose dim 0 has the batch's size
    (the others, e.g. a mask, are shared by every example)."""
    tensors = [t for t in leaves if isinstance(t, Tensor)]
    if not tensors or tensors[0].dim() == 0:
        raise UnsupportedLayer("no batched tensor input to take per-example gradients through")
    if isinstance(module, nn.RNNBase):
        if tensors[0].dim() != 3:
            raise UnsupportedLayer("an unbatched or packed input has no examples to separate")
        dim = 0 if module.batch_first else 1
        in_dims = [None if not isinstance(t, Tensor) else dim if n == "input" else 1 for t, n in zip(leaves, names)]
        return in_dims, [dim] + [1] * (len(out_leaves) - 1), tensors[0].shape[dim]
    if isinstance(module, nn.MultiheadAttention):
        dim = 0 if module.batch_first else 1
        in_dims = []
        for t, n in zip(leaves, names):
            if not isinstance(t, Tensor):
                in_dims.append(None)
            elif n in ("query", "key", "value"):
                in_dims.append(dim)
            elif n == "key_padding_mask":
                in_dims.append(0)
            elif n == "attn_mask" and t.dim() == 3:
                raise UnsupportedLayer("a 3-d attn_mask mixes examples and heads in dim 0; pass a 2-d mask")
            else:
                in_dims.append(None)
        return in_dims, [dim] + [0] * (len(out_leaves) - 1), tensors[0].shape[dim]
    batch = tensors[0].shape[0]
    in_dims = [0 if isinstance(t, Tensor) and t.dim() and t.shape[0] == batch else None for t in leaves]
    return in_dims, [0] * len(out_leaves), batch


class FunctionalRule(LayerRule):
    """Any module whose forward treats the examples of a batch independently, by ``torch.func``.

    The per-example gradients of all the module's trainable parameters (its descendants'
    included) come from ``vmap`` over the examples of ``vjp`` of ``functional_call(module,
    params, one example's inputs)``, pulled back with that example's saved output gradients, a
    chunk of examples at a time. The module's forward runs again (under the same autocast), so
    it must be a function of its inputs and parameters: random numbers inside it (dropout in
    the layer) are refused, as is anything ``vmap`` cannot run. Examples are found as
    :func:`_example_dims` says.
    """

    def accepts(self, module, label):
        return True

    def parameters(self, module):
        return [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    def capture(self, module, args, kwargs, output):
        from torch.utils._pytree import tree_flatten, tree_flatten_with_path

        if isinstance(module, nn.RNNBase) and len(args) == 1 and kwargs.get("hx") is None and args[0].dim() == 3:
            # the zero state the module makes itself, made here with the batch's size: a state made
            # inside the forward would not follow vmap's examples
            x = args[0]
            batch, layers = x.shape[0 if module.batch_first else 1], module.num_layers * (2 if module.bidirectional else 1)
            h = x.new_zeros(layers, batch, module.proj_size or module.hidden_size)
            args = (x, (h, x.new_zeros(layers, batch, module.hidden_size)) if isinstance(module, nn.LSTM) else h)
            kwargs = {k: v for k, v in kwargs.items() if k != "hx"}
        flat, spec = tree_flatten_with_path((args, kwargs))
        leaves = [leaf for _, leaf in flat]
        out_leaves, _ = tree_flatten(output)
        in_dims, out_dims, batch = _example_dims(module, leaves, _argument_names(module, [p for p, _ in flat]), out_leaves)
        picked = [i for i, t in enumerate(out_leaves) if isinstance(t, Tensor) and t.requires_grad]
        device = next((t.device.type for t in leaves if isinstance(t, Tensor)), "cpu")
        autocast = (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
        saved = [t.detach() if isinstance(t, Tensor) else t for t in leaves]
        call = LayerCall(module, self, saved, [out_leaves[i] for i in picked],
                         [t for t in leaves if isinstance(t, Tensor)], batch=batch)
        call.cache.update(spec=spec, in_dims=in_dims, out_dims=[out_dims[i] for i in picked], picked=picked,
                          autocast=autocast)
        return call

    def prepare(self, call, dtype):
        if "prepared" in call.cache:
            return  # the output gradients stay in the outputs' own dtypes (the cotangents of vjp)
        call.cache["prepared"], call.cache["dtype"] = True, dtype

    def _chunk(self, call: LayerCall, rows: slice) -> Dict[str, Tensor]:
        """``{name: [n, *shape]}``: the per-example gradients of every parameter for ``rows``."""
        if call.cache.get("rows") == (rows.start, rows.stop):
            return call.cache["chunk"]
        from torch.func import functional_call, vjp, vmap
        from torch.utils._pytree import tree_flatten, tree_unflatten

        module, cache = call.module, call.cache
        params = {n: p.detach() for n, p in self.parameters(module)}
        in_dims, out_dims, picked = cache["in_dims"], cache["out_dims"], cache["picked"]
        batched = [t.narrow(d, rows.start, rows.stop - rows.start) if d is not None else t
                   for t, d in zip(call.inputs, in_dims)]
        cotangents = [call.grads[i].narrow(d, rows.start, rows.stop - rows.start) if i in call.grads
                      else torch.zeros(call.out_meta[i][0], dtype=call.out_meta[i][1], device=call.out_meta[i][2]
                                       ).narrow(d, rows.start, rows.stop - rows.start)
                      for i, d in enumerate(out_dims)]

        def one(leaves, grads):
            # one example, its example dim put back with size 1: the module sees a batch of one
            whole = [t.unsqueeze(d) if d is not None else t for t, d in zip(leaves, in_dims)]
            args, kwargs = tree_unflatten(whole, cache["spec"])

            def forward(p):
                out_leaves, _ = tree_flatten(functional_call(module, p, tuple(args), kwargs, strict=False))
                return tuple(out_leaves[i] for i in picked)

            outs, pull = vjp(forward, params)
            return pull(tuple(g.unsqueeze(d).to(o.dtype) for g, d, o in zip(grads, out_dims, outs)))[0]

        context = torch.autocast(*cache["autocast"]) if cache["autocast"] else contextlib.nullcontext()
        try:
            with context, warnings.catch_warnings():
                # RNN kernels have no vmap batching rule: vmap loops over the chunk's examples (exact,
                # slower; docs/algorithm.md §1.1 gives the cost), which it would announce each time
                warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
                grads = vmap(one, in_dims=(list(in_dims), list(out_dims)), randomness="error")(batched, cotangents)
        except RuntimeError as error:
            if "random" in str(error):
                raise UnsupportedLayer(
                    "its forward draws random numbers (dropout inside the layer), which the per-example rule cannot "
                    "draw again: move the dropout out of the layer, or set it to 0"
                ) from None
            raise UnsupportedLayer("the general per-example rule cannot run its forward under torch.func.vmap "
                                   f"({str(error).splitlines()[0][:160]})") from None
        chunk = {n: g.to(cache["dtype"]) for n, g in grads.items()}
        cache["rows"], cache["chunk"] = (rows.start, rows.stop), chunk
        return chunk

    def _rows_per_chunk(self, call: LayerCall) -> int:
        numel = sum(p.numel() for _, p in self.parameters(call.module))
        return max(1, min(call.batch, _FUNCTIONAL_CHUNK_ELEMENTS // max(1, numel)))

    def _squares(self, call, names):
        squares: Dict[str, Tensor] = {}
        step = self._rows_per_chunk(call)
        for start in range(0, call.batch, step):
            chunk = self._chunk(call, slice(start, min(start + step, call.batch)))
            for n in names:
                if n not in squares:
                    squares[n] = chunk[n].new_zeros(chunk[n].shape[1:])
                _accumulate_(squares[n], chunk[n])
        return squares

    def _per_example(self, call, name, rows):
        return self._chunk(call, slice(rows.start or 0, min(rows.stop, call.batch)))[name]


#: Per-example gradients formed at once by the general rule (float32: 64 MB): vmap runs
#: faster on larger chunks, and a layer's whole parameter set is in each.
_FUNCTIONAL_CHUNK_ELEMENTS = 1 << 24

#: The hand-written rules, asked in order (each for its exact layer type; a subclass with its own
#: ``forward`` takes the general rule); :class:`FunctionalRule` serves every other layer.
RULES: Tuple[LayerRule, ...] = (LinearRule(), Conv2dRule(), EmbeddingRule(), LSTMLayerRule(), LayerNormRule(), RMSNormRule())
GENERAL_RULE = FunctionalRule()


def rule_for_module(module: nn.Module, label: str) -> LayerRule:
    """The rule for a module with trainable parameters of its own: a hand-written one for its exact
    type, else the general one; :class:`UnsupportedLayer` for what neither can do exactly."""
    for rule in RULES:
        own_forward = not rule.types or type(module).forward is next(
            (base.forward for base in rule.types if isinstance(module, base)), None)
        if own_forward and rule.accepts(module, label):
            return rule
    return GENERAL_RULE
