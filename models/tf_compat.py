"""TensorFlow-compatibility helpers: "SAME" padding and TF initialisers.

The test problems of docs/problems.md are defined by DeepOBS in TensorFlow. Two TF
conventions have no direct PyTorch equivalent and are reproduced here:

* **"SAME" padding.** TF pads so that ``out = ceil(in / stride)`` and, when the
  total padding is odd, puts the extra pixel at the *bottom/right*. PyTorch's
  ``padding=`` argument is symmetric, so for stride 2 (3c3d's max-pool 3/2,
  the WRN's stride-2 3x3 convolutions) the two disagree: on a 28-pixel input a
  3/2 pool needs one pad pixel, which TF places after the last row/column and a
  symmetric ``padding=1`` would place on both sides (and produce 14 vs 14
  outputs from *shifted* windows). For max-pooling TF's padding never wins the
  max, i.e. it behaves like ``-inf`` padding.
* **Initialisers.** ``tf.truncated_normal_initializer`` (resample outside
  ±2σ) and TF/Keras ``glorot_normal`` (a truncated normal whose standard
  deviation is corrected so the *truncated* distribution has variance
  ``2 / (fan_in + fan_out)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "tf_same_padding",
    "TFSamePad",
    "TFSameConv2d",
    "TFSameMaxPool2d",
    "tf_truncated_normal_",
    "tf_glorot_normal_",
    "glorot_uniform_",
]


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def tf_same_padding(size: int, kernel_size: int, stride: int = 1, dilation: int = 1) -> tuple[int, int]:
    """Return ``(pad_before, pad_after)`` of TF ``padding="SAME"`` along one axis.

    TF: ``out = ceil(size / stride)``, ``total = max((out - 1) * stride + k_eff - size, 0)``
    with ``k_eff = (kernel_size - 1) * dilation + 1``; ``before = total // 2`` and the
    remainder goes *after* (bottom/right). Examples: 28, k3, s2 -> (0, 1);
    28, k5, s1 -> (2, 2); 32, k1, s2 -> (0, 0); 5, k3, s2 -> (1, 1).
    """
    if size < 1 or kernel_size < 1 or stride < 1 or dilation < 1:
        raise ValueError("size, kernel_size, stride and dilation must be positive")
    k_eff = (kernel_size - 1) * dilation + 1
    out = -(-size // stride)  # ceil
    total = max((out - 1) * stride + k_eff - size, 0)
    return total // 2, total - total // 2


class TFSamePad(nn.Module):
    """Pad an ``(N, C, H, W)`` tensor exactly like TF ``padding="SAME"`` would.

    Computed from the incoming spatial size at every call (so it is correct for
    any input size), asymmetric when the total padding is odd (extra pixel
    bottom/right, as in TF). Use ``value=0`` in front of a convolution and
    ``value=-inf`` in front of a max-pool (TF's max-pool ignores its padding).
    No copy is made when no padding is needed (e.g. 2/2 pooling of even sizes).
    """

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        dilation: int | tuple[int, int] = 1,
        value: float = 0.0,
    ) -> None:
        super().__init__()
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.value = float(value)

    def padding_for(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(left, right, top, bottom)`` padding for an input of the given size (F.pad order)."""
        top, bottom = tf_same_padding(height, self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = tf_same_padding(width, self.kernel_size[1], self.stride[1], self.dilation[1])
        return left, right, top, bottom

    def forward(self, x: Tensor) -> Tensor:
        pad = self.padding_for(x.shape[-2], x.shape[-1])
        if not any(pad):
            return x
        return F.pad(x, pad, mode="constant", value=self.value)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}, value={self.value}"


class TFSameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TF ``padding="SAME"`` semantics (zero padding, extra pixel bottom/right).

    Needed for strided convolutions (the WRN's stride-2 3x3 convs: on a 32x32
    input TF pads 0 top/left and 1 bottom/right, PyTorch's ``padding=1`` would pad
    both sides and shift every window by one pixel). Keeps ``weight``/``bias``
    names and ``isinstance(m, nn.Conv2d)``, so L2 collection treats it as a conv.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, dilation=dilation, bias=bias)
        self.same_pad = TFSamePad(self.kernel_size, self.stride, self.dilation, value=0.0)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.same_pad(x))


class TFSameMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` with TF ``padding="SAME"`` semantics.

    Pads with ``-inf`` (TF's max-pool never selects a padding value) and puts the
    extra pixel bottom/right. 3c3d's 3/2 pools map 28->14, 12->6, 6->3 with one
    pad row/column after the data; 2c2d's 2/2 pools on 28 and 14 need no padding.
    """

    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None) -> None:
        super().__init__(kernel_size, stride=stride if stride is not None else kernel_size, padding=0)
        self.same_pad = TFSamePad(self.kernel_size, self.stride, 1, value=float("-inf"))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.same_pad(x))


def tf_truncated_normal_(tensor: Tensor, std: float, mean: float = 0.0) -> Tensor:
    """In place: ``tf.truncated_normal_initializer(mean, stddev=std)``.

    Normal(mean, std) with values outside ``mean ± 2·std`` re-drawn; ``std`` is the
    pre-truncation parameter, as in TF (no variance correction).
    """
    return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=mean - 2.0 * std, b=mean + 2.0 * std)


# Std of a standard normal truncated to [-2, 2]; TF's VarianceScaling divides by it.
_TRUNC_STD_CORRECTION = 0.87962566103423978


def _fans(tensor: Tensor) -> tuple[int, int]:
    # PyTorch's rule gives the same fans as TF for dense ([out, in] vs TF [in, out])
    # and conv kernels ([out, in, kh, kw] vs TF [kh, kw, in, out]).
    return nn.init._calculate_fan_in_and_fan_out(tensor)


def tf_glorot_normal_(tensor: Tensor) -> Tensor:
    """In place: TF/Keras ``glorot_normal`` = ``VarianceScaling(1, "fan_avg", "truncated_normal")``.

    Truncated normal at ±2σ' with ``σ' = sqrt(2 / (fan_in + fan_out)) / 0.8796...``,
    so that the truncated distribution has variance ``2 / (fan_in + fan_out)``.
    """
    fan_in, fan_out = _fans(tensor)
    std = math.sqrt(2.0 / (fan_in + fan_out)) / _TRUNC_STD_CORRECTION
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


def glorot_uniform_(tensor: Tensor, fan_in: int | None = None, fan_out: int | None = None) -> Tensor:
    """In place: Glorot/Xavier uniform, ``U(±sqrt(6 / (fan_in + fan_out)))``.

    Fans default to PyTorch's (= TF's) rule for the tensor; pass them explicitly
    when a TF variable is split over several PyTorch tensors (LSTM kernel) or for
    1-D TF variables (TF uses ``fan_in = fan_out = len``).
    """
    if fan_in is None or fan_out is None:
        if tensor.dim() == 1:
            fi = fo = tensor.numel()
        else:
            fi, fo = _fans(tensor)
        fan_in = fi if fan_in is None else fan_in
        fan_out = fo if fan_out is None else fan_out
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        return tensor.uniform_(-limit, limit)
