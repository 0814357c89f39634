"""``BoringModule``: the one tiny LightningModule of the tests (like Lightning's BoringModel).

Linear → tanh → Dropout → Linear, cross-entropy on a flattened input, ``train/loss``
logged. Parameter names: ``hidden.weight``, ``hidden.bias``, ``out.weight``, ``out.bias``.
``dropout > 0`` makes training draw random numbers (so a callback that draws some, or
reseeds, changes the trajectory); use ``dropout=0`` where two runs must agree across
process layouts (DDP vs one process). The optimizer is picked by its name in the method
table (``lightning_msvag.registry``; any spelling ``build_optimizer`` accepts: ``"msvag"``,
``"adam"``) and the project's optimizers take the library's default path unless ``fused`` is given.
"""

from __future__ import annotations

from typing import Optional

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_msvag as lm
from lightning_msvag.registry import get_method

PARAMETER_NAMES = ["hidden.weight", "hidden.bias", "out.weight", "out.bias"]


class BoringModule(pl.LightningModule):
    def __init__(
        self,
        in_features: int = 6,
        hidden: int = 12,
        classes: int = 3,
        dropout: float = 0.25,
        optimizer: str = "msvag",
        lr: float = 0.1,
        fused: Optional[bool] = None,
    ):
        super().__init__()
        self.hidden = nn.Linear(in_features, hidden)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, classes)
        self.optimizer_name, self.lr, self.fused = optimizer, lr, fused

    def forward(self, x):
        return self.out(self.dropout(torch.tanh(self.hidden(x.flatten(1)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)  # a mean: DDP's average = the global-batch mean
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        method = get_method(self.optimizer_name)
        paths = {"fused": self.fused} if issubclass(method.cls, lm.DissectedOptimizer) else {}
        return lm.build_optimizer(method.name, self.parameters(), lr=self.lr, **paths)


def random_loader(n: int = 48, in_features: int = 6, batch_size: int = 8, shuffle: bool = True) -> DataLoader:
    """A fixed 3-class problem; ``shuffle`` draws the order from the global torch RNG at every epoch."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, in_features, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)
