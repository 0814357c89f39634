"""P1 ``fmnist_2c2d`` and P2 ``cifar10_3c3d`` (docs/problems.md; DeepOBS ``_2c2d.py`` / ``_3c3d.py``)."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from .base import ClassificationProblem
from .tf_compat import TFSameMaxPool2d, glorot_uniform_, tf_glorot_normal_, tf_truncated_normal_

__all__ = ["TwoC2D", "ThreeC3D"]


class TwoC2D(ClassificationProblem):
    """P1 ``fmnist_2c2d``: two conv + two dense layers for 28×28×1 Fashion-MNIST (docs/problems.md, DeepOBS ``_2c2d``).

    ``conv5x5(1→32, same)+ReLU, maxpool 2/2 same, conv5x5(32→64, same)+ReLU,
    maxpool 2/2 same, fc(3136→1024)+ReLU, fc(1024→10)``; 3,274,634 parameters.
    Init as DeepOBS: all weights ``tf.truncated_normal_initializer(stddev=0.05)``
    (truncated at ±2σ), all biases 0.05. No weight decay by default.

    Stride-1 5×5 "same" padding is symmetric (2 each side), so plain
    ``padding=2`` is exact; the 2/2 pools use the TF-"same" pool, which pads
    nothing for the even sizes 28 and 14. The flatten is NCHW (C, H, W) order
    instead of TF's (H, W, C) — a fixed permutation of fc1's input rows, which
    changes nothing for an i.i.d. initialisation.

    Args:
        num_classes: number of outputs (10 for Fashion-MNIST).
        weight_decay: L2 factor ``wd`` of ``(wd/2)·Σ‖W‖²``; DeepOBS uses none (0).
    """

    def __init__(self, num_classes: int = 10, weight_decay: float = 0.0) -> None:
        super().__init__(num_classes=num_classes, weight_decay=weight_decay)
        self.save_hyperparameters()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5, padding=2)
        self.pool1 = TFSameMaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.pool2 = TFSameMaxPool2d(2, 2)
        self.fc1 = nn.Linear(7 * 7 * 64, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        for layer in (self.conv1, self.conv2, self.fc1, self.fc2):
            tf_truncated_normal_(layer.weight, std=0.05)
            nn.init.constant_(layer.bias, 0.05)
        self._collect_l2_modules()

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, 1, 28, 28]`` -> logits ``[B, num_classes]``."""
        x = self.pool1(F.relu(self.conv1(x)))
        x = self.pool2(F.relu(self.conv2(x)))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class ThreeC3D(ClassificationProblem):
    """P2 ``cifar10_3c3d``: three conv + three dense layers for 32×32×3 CIFAR-10 (docs/problems.md, DeepOBS ``_3c3d``).

    ``conv5x5(3→64, valid)+ReLU, maxpool 3/2 same, conv3x3(64→96, valid)+ReLU,
    maxpool 3/2 same, conv3x3(96→128, same)+ReLU, maxpool 3/2 same,
    fc(1152→512)+ReLU, fc(512→256)+ReLU, fc(256→10)``; 895,210 parameters.
    Spatial sizes 32 →conv 28 →pool 14 →conv 12 →pool 6 →conv 6 →pool 3.

    The 3/2 "same" pools need one pad row/column, which TF puts bottom/right
    (never top/left); :class:`~lightning_msvag.models.tf_compat.TFSameMaxPool2d` reproduces that
    with ``-inf`` padding. PyTorch's symmetric ``padding=1`` would shift every
    pooling window.

    **Initialisation.** DeepOBS's code (TF ``_3c3d.py`` and its own PyTorch port)
    initialises the *conv* kernels with ``glorot_normal`` and the *dense* kernels
    with ``glorot_uniform``, biases 0. The default follows that code
    (``conv_init="glorot_normal"``, TF1's truncated-normal variant, docs/problems.md P2);
    ``conv_init="glorot_uniform"`` gives Glorot-uniform convs instead. Dense kernels are
    Glorot-uniform either way.

    Args:
        num_classes: number of outputs (10 for CIFAR-10).
        weight_decay: L2 factor ``wd``; DeepOBS default 0.002 (loss term ``0.001·Σ‖W‖²``).
        conv_init: ``"glorot_normal"`` (DeepOBS code) or ``"glorot_uniform"``.
    """

    def __init__(self, num_classes: int = 10, weight_decay: float = 0.002, conv_init: Literal["glorot_normal", "glorot_uniform"] = "glorot_normal") -> None:
        super().__init__(num_classes=num_classes, weight_decay=weight_decay)
        if conv_init not in ("glorot_normal", "glorot_uniform"):
            raise ValueError(f"conv_init must be 'glorot_normal' or 'glorot_uniform', got {conv_init!r}")
        self.save_hyperparameters()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=5)  # valid
        self.pool1 = TFSameMaxPool2d(3, 2)
        self.conv2 = nn.Conv2d(64, 96, kernel_size=3)  # valid
        self.pool2 = TFSameMaxPool2d(3, 2)
        self.conv3 = nn.Conv2d(96, 128, kernel_size=3, padding=1)  # same, stride 1: symmetric
        self.pool3 = TFSameMaxPool2d(3, 2)
        self.fc1 = nn.Linear(3 * 3 * 128, 512)
        self.fc2 = nn.Linear(512, 256)
        self.fc3 = nn.Linear(256, num_classes)
        conv_init_fn = tf_glorot_normal_ if conv_init == "glorot_normal" else glorot_uniform_
        for conv in (self.conv1, self.conv2, self.conv3):
            conv_init_fn(conv.weight)
            nn.init.zeros_(conv.bias)
        for fc in (self.fc1, self.fc2, self.fc3):
            glorot_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        self._collect_l2_modules()

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, 3, 32, 32]`` -> logits ``[B, num_classes]``."""
        x = self.pool1(F.relu(self.conv1(x)))
        x = self.pool2(F.relu(self.conv2(x)))
        x = self.pool3(F.relu(self.conv3(x)))
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)
