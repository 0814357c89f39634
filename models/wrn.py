"""P3 ``cifar100_wrn404``: pre-activation Wide ResNet 40-4 (docs/problems.md; DeepOBS ``_wrn.py``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import ClassificationProblem
from .tf_compat import TFSameConv2d, TFSameMaxPool2d, glorot_uniform_

__all__ = ["PreActResidualUnit", "WideResNet404"]


def _conv3x3(in_channels: int, out_channels: int, stride: int) -> nn.Conv2d:
    if stride == 1:
        # TF "SAME" with stride 1 and an odd kernel is symmetric: plain padding=1 is exact.
        return nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=False)
    # Stride 2: TF pads 0 top/left, 1 bottom/right on even sizes; padding=1 would shift the grid.
    return TFSameConv2d(in_channels, out_channels, 3, stride=stride, bias=False)


class PreActResidualUnit(nn.Module):
    """One pre-activation residual unit of DeepOBS's WRN (docs/problems.md).

    Residual branch ``BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3``. Shortcut as in
    DeepOBS ``_wrn.py``:

    * first unit of a group (``first=True``): taken from the *pre-activated*
      input ``relu(bn1(x))`` — a 1×1 conv (with the unit's stride) when channels
      or stride change, else identity (or, DeepOBS's unreachable-for-WRN case of
      equal channels with stride > 1, a ``stride×stride`` max-pool);
    * other units: identity on the raw input ``x``.

    A 1×1 stride-2 conv needs no padding under TF "SAME" for any size, so a plain
    ``nn.Conv2d`` is exact there. Convs are bias-free; BN has affine scale and shift.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        first: bool = False,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if not first and (in_channels != out_channels or stride != 1):
            raise ValueError("only the first unit of a group may change channels or stride")
        self.first = first
        self.bn1 = nn.BatchNorm2d(in_channels, eps=bn_eps, momentum=bn_momentum)
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum)
        self.conv2 = _conv3x3(out_channels, out_channels, 1)
        self.shortcut: nn.Module | None
        if first and in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
        elif first and stride != 1:
            self.shortcut = TFSameMaxPool2d(stride, stride)
        else:
            self.shortcut = None  # identity

    def forward(self, x: Tensor) -> Tensor:
        if self.first:
            x = F.relu(self.bn1(x))
            shortcut = x if self.shortcut is None else self.shortcut(x)
            out = self.conv1(x)
        else:
            shortcut = x
            out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class WideResNet404(ClassificationProblem):
    """P3 ``cifar100_wrn404``: pre-activation Wide ResNet 40-4 for CIFAR-100 (docs/problems.md, DeepOBS ``_wrn``).

    ``conv3x3(3→16)``; three groups of ``(depth − 4) / 6`` = 6
    :class:`PreActResidualUnit` with ``16·width, 32·width, 64·width`` = 64/128/256
    filters and first-unit strides 1/2/2; head ``BN-ReLU-global avg pool-fc(256→100)``.
    8,972,340 parameters for the defaults: 8,935,856 conv weights + 10,784 BN
    parameters (5,392 BN channels × affine γ and β — TF ``batch_normalization``
    defaults ``center=scale=True``) + 25,700 for the fc layer *with* bias.

    BN: TF decay 0.9 = PyTorch ``momentum=0.1``, ``eps=1e-5``. Bias-free convs.
    Stride-2 3×3 convs use TF "SAME" (asymmetric) padding.

    **Initialisation** as DeepOBS ``_wrn.py`` (which, unlike the original WRN
    paper, does not use He init): Glorot-uniform for every conv kernel and the
    fc kernel, fc bias 0, BN ``γ = 1, β = 0`` (TF defaults).

    ``depth``/``width`` exist for tiny test networks (e.g. depth 10, width 1); the
    problem itself is the default 40/4 with 100 classes.

    Args:
        depth: total depth, ``6·n + 4`` (40 -> 6 units per group).
        width: widening factor (4).
        num_classes: number of outputs (100 for CIFAR-100).
        weight_decay: L2 factor ``wd`` on conv and fc weights; DeepOBS default 5e-4.
        bn_momentum: PyTorch BN momentum (``1 − TF decay``), 0.1.
        bn_eps: BN epsilon, 1e-5.
    """

    def __init__(
        self,
        depth: int = 40,
        width: int = 4,
        num_classes: int = 100,
        weight_decay: float = 5e-4,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__(num_classes=num_classes, weight_decay=weight_decay)
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n + 4 with n >= 1, got {depth}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.save_hyperparameters()
        units_per_group = (depth - 4) // 6
        filters = [16, 16 * width, 32 * width, 64 * width]
        strides = [1, 2, 2]

        self.conv1 = nn.Conv2d(3, filters[0], 3, padding=1, bias=False)
        groups = []
        for g in range(3):
            units = [
                PreActResidualUnit(filters[g], filters[g + 1], strides[g], True, bn_momentum, bn_eps)
            ]
            units += [
                PreActResidualUnit(filters[g + 1], filters[g + 1], 1, False, bn_momentum, bn_eps)
                for _ in range(units_per_group - 1)
            ]
            groups.append(nn.Sequential(*units))
        self.group1, self.group2, self.group3 = groups
        self.bn = nn.BatchNorm2d(filters[3], eps=bn_eps, momentum=bn_momentum)
        self.fc = nn.Linear(filters[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                glorot_uniform_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        glorot_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        self._collect_l2_modules()

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, 3, H, W]`` (32×32 for CIFAR) -> logits ``[B, num_classes]``."""
        x = self.conv1(x)
        x = self.group3(self.group2(self.group1(x)))
        x = F.relu(self.bn(x))
        return self.fc(x.mean(dim=(2, 3)))
