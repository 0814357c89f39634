"""A small decoder-only transformer language model on War and Peace (not one of the paper's problems).

The model optimizer papers now test on, for the mini-batch variance estimate (docs/algorithm.md
§1.1) and the family alike: character tokens, a GPT-style stack of pre-norm blocks with causal
self-attention, and an output layer tied to the token embedding. It trains on the same batches
as P4 (:class:`lightning_msvag.datamodules.TolstoiDataModule`, 50 rows of 50 characters): each row is one
example, every position predicts the next character, the loss is the mean cross-entropy.

Layout (every parameter sits in a layer with a hand-written per-example rule)::

    tokens [B, T] ─ Embedding(V, d) + Embedding(T_max, d) (positions) ─ dropout
      └ N × [ x + Attention(LayerNorm(x)),  x + MLP(LayerNorm(x)) ]
    ─ LayerNorm ─ Linear(d, V, no bias; weight = the token embedding's) ─ logits [B, T, V]

    Attention: Linear(d, 3d) → q, k, v in h heads → scaled_dot_product_attention (causal) → Linear(d, d)
    MLP:       Linear(d, 4d) → GELU → Linear(4d, d)

Dropout sits between layers (on the embeddings, after attention and after the MLP), so a
layer's saved input is the dropped-out one. Attention mixes the positions of a row, never rows.
Weights are initialised as in GPT-2: normal(0, 0.02), the residual projections scaled by
1/√(2N), zero biases.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ClassificationProblem

__all__ = ["CharTransformer", "TransformerBlock"]


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attention(LayerNorm(x))``, then ``x + MLP(LayerNorm(x))``."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, steps, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, steps, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        attended = attended.transpose(1, 2).reshape(batch, steps, width)
        x = x + F.dropout(self.proj(attended), self.dropout, self.training)
        return x + F.dropout(self.out(F.gelu(self.fc(self.norm2(x)))), self.dropout, self.training)


class CharTransformer(ClassificationProblem):
    """Decoder-only character transformer with a tied embedding/output layer (see the module docstring).

    Args:
        vocab_size: number of symbols (War and Peace: 83).
        width: model width d.
        depth: number of blocks N.
        heads: attention heads per block.
        context: the longest sequence (positions 0 … context − 1).
        dropout: dropout on the embeddings and the residual branches, in training.
        weight_decay: L2 factor of the loss term (ClassificationProblem; its layers' weights).
    """

    def __init__(
        self,
        vocab_size: int = 83,
        width: int = 128,
        depth: int = 2,
        heads: int = 4,
        context: int = 50,
        dropout: float = 0.1,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(num_classes=vocab_size, weight_decay=weight_decay)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if depth < 1 or context < 1:
            raise ValueError(f"depth and context must be >= 1, got {depth} and {context}")
        self.save_hyperparameters()
        self.dropout = float(dropout)
        self.context = int(context)
        self.embedding = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.head.weight = self.embedding.weight  # tied: one parameter, two layers
        self.apply(self._init_weights)
        for block in self.blocks:
            for residual in (block.proj, block.out):
                nn.init.normal_(residual.weight, std=0.02 / math.sqrt(2 * depth))
        self._collect_l2_modules()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``LongTensor [B, T]`` (T ≤ context) → logits ``[B, T, vocab_size]``."""
        batch, steps = x.shape
        if steps > self.context:
            raise ValueError(f"sequence of {steps} characters is longer than the context {self.context}")
        # the positions as a [B, T] batch: each example's own rows of the position table
        positions = torch.arange(steps, device=x.device).expand(batch, steps)
        h = F.dropout(self.embedding(x) + self.positions(positions), self.dropout, self.training)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))
