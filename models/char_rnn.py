"""P4 ``tolstoi_char_rnn``: two-layer character LSTM (docs/problems.md; DeepOBS ``tolstoi_char_rnn.py``)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ClassificationProblem
from .tf_compat import glorot_uniform_

__all__ = ["TFLSTMLayer", "CharLSTM"]

State = tuple[Tensor, Tensor]

#: Key under which the training-stream state is stored in Lightning checkpoints.
CHECKPOINT_STATE_KEY = "char_lstm_train_state"


class TFLSTMLayer(nn.Module):
    """One LSTM layer with exactly the variables and maths of TF's ``LSTMCell(forget_bias=1.0)``.

    TF's cell has one kernel ``[in + h, 4h]`` and *one* bias ``[4h]`` and adds a
    constant ``forget_bias = 1.0`` to the forget-gate pre-activation. PyTorch's
    ``nn.LSTM`` has two biases (``b_ih``, ``b_hh``), which would add 4h parameters
    per layer and break the 284,499 count. Here the layer owns ``weight_ih``
    ``[4h, in]``, ``weight_hh`` ``[4h, h]`` (the two halves of TF's kernel) and one
    trainable ``bias``; the fused ``torch.lstm`` kernel's second bias slot gets a
    constant, non-persistent buffer that is 1 on the forget-gate slice and 0
    elsewhere — precisely TF's ``+ forget_bias``. Gate order is PyTorch's
    ``i, f, g, o`` (TF: ``i, j, f, o``); with i.i.d. init the order is immaterial.

    Initialisation as TF: the kernel is Glorot-uniform over the *concatenated*
    ``[in + h, 4h]`` matrix (limit ``sqrt(6 / (in + h + 4h))``), bias 0.

    On CUDA, cuDNN would warn that the weights are not one contiguous block; the
    compaction it does is cheap at this size and the warning is silenced.
    """

    def __init__(self, input_size: int, hidden_size: int, forget_bias: float = 1.0) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.zeros(4 * hidden_size))
        const = torch.zeros(4 * hidden_size)
        const[hidden_size : 2 * hidden_size] = forget_bias  # PyTorch gate order i, f, g, o
        self.register_buffer("forget_bias_hh", const, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """TF defaults: Glorot-uniform over the joint ``[in + h, 4h]`` kernel, zero bias."""
        fan_in, fan_out = self.input_size + self.hidden_size, 4 * self.hidden_size
        glorot_uniform_(self.weight_ih, fan_in=fan_in, fan_out=fan_out)
        glorot_uniform_(self.weight_hh, fan_in=fan_in, fan_out=fan_out)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """``x``: ``[B, T, in]``, ``state``: ``(h, c)`` each ``[1, B, h]`` -> ``(out [B, T, h], (h, c))``."""
        # One dtype for input, state and weights: the fused kernels (oneDNN on CPU) reject a
        # mix, e.g. a bf16 input with a float32 carried state. Under autocast (bf16-mixed,
        # 16-mixed) that is the autocast dtype, else the weights' dtype.
        dtype = self.weight_ih.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        params = [self.weight_ih, self.weight_hh, self.bias, self.forget_bias_hh]
        params = [p.to(dtype) for p in params]
        state = (state[0].to(dtype), state[1].to(dtype))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous chunk")
            out, h, c = torch.lstm(x.to(dtype), state, params, True, 1, 0.0, self.training, False, True)
        return out, (h, c)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}"


class CharLSTM(ClassificationProblem):
    """P4 ``tolstoi_char_rnn``: 2-layer character LSTM on War and Peace (docs/problems.md, DeepOBS).

    ``embedding(83→128)``; two :class:`TFLSTMLayer` of 128 units (TF
    ``LSTMCell``, forget bias +1), each wrapped like TF's
    ``DropoutWrapper(input_keep_prob=0.8, output_keep_prob=0.8)`` — dropout
    ``p = 0.2`` on each layer's input *and* output in training, so between the
    layers dropout is applied twice; ``linear(128→83)`` on every time step.
    284,499 parameters = 83·128 + 2·((128+128)·512 + 512) + (128·83 + 83).

    Init as DeepOBS/TF defaults: ``tf.get_variable`` without initializer is
    Glorot-uniform, so the embedding, the LSTM kernels (over the joint
    ``[in + h, 4h]`` matrix), the softmax kernel *and the softmax bias* are
    Glorot-uniform (TF gives a 1-D variable ``fan_in = fan_out = 83``, limit
    ``sqrt(6/166)``); only the LSTM biases (``LSTMCell``'s zeros initialiser) are 0.

    Loss: mean per-character cross-entropy over ``batch × time``; accuracy per
    character. Inputs and targets are ``LongTensor [B, T]``. No weight decay by
    default (DeepOBS has none; if set, only the softmax ``nn.Linear`` weight would
    enter the L2 term, following the conv/linear rule).

    **State carry (truncated BPTT).** Each data stream — ``"train"``, and per
    dataloader ``"val/k"``, ``"test/k"``, ``"predict/k"`` — carries its own final
    ``(h, c)`` (undropped, as TF's state variables) into its next batch, detached
    so no gradient crosses batches. A stream's state is reset to zero when
    ``batch_idx == 0`` (start of every epoch and every evaluation pass,
    including Lightning's sanity check, which therefore never touches the
    training stream), when the batch size changes (e.g. a last partial batch),
    and at the start of every validation/test epoch. The training state is saved
    in checkpoints (:meth:`on_save_checkpoint`) and restored on load, so a
    mid-epoch resume continues the stream. Under DDP each process carries the state of
    its own block of rows (the Tolstoi data module gives rank ``r`` of ``W`` rows
    ``[r·B/W, (r+1)·B/W)``); the checkpoint gathers all ranks' blocks in rank order, so it
    holds the state of all ``B`` rows, and on load each rank takes its own block back.

    Args:
        vocab_size: number of characters (83 for War and Peace).
        embedding_dim: embedding size (128; DeepOBS uses ``rnn_size``).
        hidden_size: LSTM units per layer (128).
        num_layers: number of LSTM layers (2).
        dropout: drop probability ``1 − keep_prob`` on each layer's input and output (0.2).
        weight_decay: L2 factor ``wd`` (0: DeepOBS has no regulariser here).
    """

    def __init__(
        self,
        vocab_size: int = 83,
        embedding_dim: int = 128,
        hidden_size: int = 128,
        num_layers: int = 2,
        dropout: float = 0.2,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(num_classes=vocab_size, weight_decay=weight_decay)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.save_hyperparameters()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dropout = float(dropout)
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm_layers = nn.ModuleList(
            TFLSTMLayer(embedding_dim if i == 0 else hidden_size, hidden_size) for i in range(num_layers)
        )
        self.dense = nn.Linear(hidden_size, vocab_size)

        glorot_uniform_(self.embedding.weight)
        glorot_uniform_(self.dense.weight)
        glorot_uniform_(self.dense.bias)  # TF get_variable default on a 1-D variable
        self._collect_l2_modules()
        # Carried (h, c) per data stream; plain tensors, not buffers (never in state_dict).
        self._stream_states: dict[str, State] = {}

    # ----------------------------------------------------------------- model
    def zero_state(self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> State:
        """All-zero ``(h, c)``, each ``[num_layers, batch_size, hidden_size]``."""
        w = self.dense.weight
        shape = (self.num_layers, batch_size, self.hidden_size)
        h = torch.zeros(shape, device=device or w.device, dtype=dtype or w.dtype)
        return h, torch.zeros_like(h)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """``x``: ``LongTensor [B, T]``; ``state``: ``(h, c)`` each ``[L, B, H]`` or ``None`` (zeros).

        Returns ``(logits [B, T, vocab_size], (h, c))`` like ``nn.LSTM``; the returned
        state is *not* detached.
        """
        if state is None:
            state = self.zero_state(x.shape[0], device=x.device)
        h0, c0 = state
        out = self.embedding(x)
        hs, cs = [], []
        for i, layer in enumerate(self.lstm_layers):
            out = F.dropout(out, self.dropout, self.training)  # DropoutWrapper input_keep_prob
            out, (h, c) = layer(out, (h0[i : i + 1], c0[i : i + 1]))
            out = F.dropout(out, self.dropout, self.training)  # DropoutWrapper output_keep_prob
            hs.append(h)
            cs.append(c)
        return self.dense(out), (torch.cat(hs), torch.cat(cs))

    # ---------------------------------------------------------- state carry
    def stream_state(self, stream: str) -> State | None:
        """The carried ``(h, c)`` of a stream (``"train"``, ``"val/0"``, ...), or ``None``."""
        return self._stream_states.get(stream)

    def reset_states(self, prefix: str = "") -> None:
        """Forget the carried state of every stream whose name starts with ``prefix`` ("" = all)."""
        for key in [k for k in self._stream_states if k.startswith(prefix)]:
            del self._stream_states[key]

    def step_logits(self, x: Tensor, stream: str, batch_idx: int) -> Tensor:
        """Forward with the stream's carried state; store the new state, detached."""
        state = None if batch_idx == 0 else self._stream_states.get(stream)
        if state is not None:
            if state[0].shape[1] != x.shape[0]:
                state = None  # batch size changed (last partial batch, other loader): start fresh
            elif state[0].device != x.device:
                state = (state[0].to(x.device), state[1].to(x.device))
        logits, (h, c) = self(x, state)
        # Truncated BPTT: the next batch starts from these values but no gradient flows back.
        # Kept in the parameters' dtype (float32 under bf16-mixed / 16-mixed), so checkpoints
        # hold the same state whatever the precision and a run can resume in another one.
        dtype = self.dense.weight.dtype
        self._stream_states[stream] = (h.detach().to(dtype), c.detach().to(dtype))
        return logits

    def on_validation_epoch_start(self) -> None:
        self.reset_states("val/")

    def on_test_epoch_start(self) -> None:
        self.reset_states("test/")

    def on_predict_epoch_start(self) -> None:
        self.reset_states("predict/")

    # ----------------------------------------------------------- checkpoint
    def _shard(self) -> tuple[int, int]:
        trainer = self._trainer
        return (0, 1) if trainer is None else (int(trainer.global_rank), int(trainer.world_size))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the training stream's ``(h, c)`` (on CPU) so a mid-epoch resume continues it.

        Under DDP (called on every rank) the ranks' row blocks are gathered along the batch
        dimension in rank order: the saved state covers all rows.
        """
        state = self._stream_states.get("train")
        if state is not None and self._shard()[1] > 1:
            h, c = (self.all_gather(t.detach().contiguous()) for t in state)  # [W, L, B/W, H]
            state = (torch.cat(h.unbind(0), dim=1), torch.cat(c.unbind(0), dim=1))
        checkpoint[CHECKPOINT_STATE_KEY] = (
            None if state is None else {"h": state[0].detach().cpu(), "c": state[1].detach().cpu()}
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the training stream's state (this rank's rows under DDP); evaluation streams restart from zero."""
        self._stream_states = {}
        saved = checkpoint.get(CHECKPOINT_STATE_KEY)
        if saved is not None:
            h, c = saved["h"], saved["c"]
            rank, world = self._shard()
            if world > 1 and h.shape[1] % world == 0:
                rows = h.shape[1] // world
                h, c = h[:, rank * rows : (rank + 1) * rows], c[:, rank * rows : (rank + 1) * rows]
            # Moved to the batch's device lazily in step_logits.
            self._stream_states["train"] = (h, c)
