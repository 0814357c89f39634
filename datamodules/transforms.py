"""Image transforms with TensorFlow semantics, for the DeepOBS CIFAR pipelines (docs/problems.md).

All transforms here act on one float image tensor of shape ``[C, H, W]`` and draw their
random numbers from torch's global generator (which the ``DataLoader`` seeds per worker).

Differences from the torchvision look-alikes, and why they are not used:

* ``tf.image.random_brightness`` *adds* a delta ``U[-max_delta, max_delta)`` to every
  pixel; ``torchvision``'s ``ColorJitter(brightness=...)`` *multiplies* by a factor.
* ``tf.image.random_saturation`` scales the saturation in HSV space and clips it to
  ``[0, 1]`` (hue and value are kept); torchvision blends with the grey-scale image.
* ``tf.image.random_contrast`` moves every channel towards/away from *that channel's* mean;
  torchvision uses one grey-scale mean for all channels and clamps to ``[0, 1]``.
* TensorFlow does not clip float images after any of these operations; neither do we.
  Values may therefore leave ``[0, 1]`` before the final per-image standardisation.

The CIFAR training pipeline (:func:`cifar_train_transform`) applies, in this fixed order
(the order of DeepOBS' ``cifar10``/``cifar100`` input functions; ColorJitter would
randomise the order):

    uint8 HWC -> float [0, 1] CHW -> zero-pad 2 -> random crop 32x32 -> random horizontal
    flip (p = 0.5) -> brightness +U[-63/255, 63/255) -> saturation x U[0.5, 1.5)
    -> contrast x U[0.2, 1.8) -> per-image standardisation

The evaluation pipeline (:func:`cifar_eval_transform`) is the float conversion followed by
per-image standardisation only.

Pixel scale (``pixel_range``): by default the uint8 pixels are mapped to ``[0, 1]`` (the
torchvision ``ToTensor`` convention that this project's brief asks for), so the brightness
delta of up to ±63/255 is up to ±25% of the pixel range.  DeepOBS' TensorFlow code instead
casts the uint8 pixels to float *without* dividing by 255, i.e. it works on ``[0, 255]``:
there the same ``max_delta = 63/255`` is at most a quarter of one grey level (practically
no brightness jitter), and the standardisation floor ``1/sqrt(3072)`` only matters for
images whose standard deviation is below 0.018 grey levels (instead of 0.018 * 255 = 4.6
grey levels on ``[0, 1]``).  Every other step is scale-invariant.  ``pixel_range=255.0``
reproduces DeepOBS-TF exactly; the CIFAR data modules expose the argument.
"""

import math
from typing import Callable

import torch
from torch import Tensor
from torchvision import transforms as T

#: DeepOBS' brightness ``max_delta`` (``tf.image.random_brightness(image, 63. / 255.)``).
CIFAR_BRIGHTNESS_MAX_DELTA = 63.0 / 255.0
CIFAR_SATURATION_RANGE = (0.5, 1.5)
CIFAR_CONTRAST_RANGE = (0.2, 1.8)
CIFAR_PAD = 2


def _uniform(low: float, high: float) -> float:
    """One draw from ``U[low, high)`` with torch's global generator."""
    return low + (high - low) * float(torch.rand(()))


class PerImageStandardization(torch.nn.Module):
    """``tf.image.per_image_standardization`` for one ``[C, H, W]`` image.

    ``(x - mean) / max(std, 1 / sqrt(N))`` where ``N = C * H * W`` and ``mean``/``std`` are
    the mean and the population standard deviation (``ddof = 0``) over *all* pixels and
    channels of this one image.  The lower bound on the divisor keeps constant images finite
    (they map to all zeros).  For a CIFAR image ``1 / sqrt(N) = 1 / sqrt(3072)``.
    """

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        std, mean = torch.std_mean(x, correction=0)
        return (x - mean) / std.clamp_min(1.0 / math.sqrt(x.numel()))


class TFRandomBrightness(torch.nn.Module):
    """``tf.image.random_brightness``: add one ``delta ~ U[-max_delta, max_delta)`` to all pixels.

    Additive (unlike torchvision's multiplicative ``ColorJitter`` brightness) and not clipped,
    as TensorFlow does for float images.
    """

    def __init__(self, max_delta: float) -> None:
        super().__init__()
        if max_delta < 0:
            raise ValueError(f"max_delta must be non-negative, got {max_delta}")
        self.max_delta = float(max_delta)

    def forward(self, x: Tensor) -> Tensor:
        return x + _uniform(-self.max_delta, self.max_delta)

    def extra_repr(self) -> str:
        return f"max_delta={self.max_delta}"


def adjust_saturation_hsv(x: Tensor, factor: float) -> Tensor:
    """TensorFlow's ``adjust_saturation`` (the fused AdjustSaturation kernel) for RGB ``[3, H, W]`` floats.

    TensorFlow converts each pixel to HSV (``V = max(r, g, b)``, ``S = (V - min) / V`` if
    ``V > 0`` else 0), multiplies S by ``factor``, clips it to ``[0, 1]`` and converts back
    with hue and value unchanged.  In closed form every channel becomes
    ``V - (V - c) * S_new / S_old = V - (V - c) * min(factor, V / (V - min))``, computed here
    without the round trip.  As in TF: grey pixels are unchanged, and pixels with ``V <= 0``
    (possible after the brightness shift) come out grey at ``V`` (TF sets their S to 0).
    """
    v = x.amax(dim=0, keepdim=True)
    span = v - x.amin(dim=0, keepdim=True)
    ratio = (v / span.clamp_min(1e-12)).clamp_max(max(float(factor), 0.0))  # S_new / S_old
    ratio = ratio.masked_fill(v <= 0, 0.0)
    return v - (v - x) * ratio


class TFRandomSaturation(torch.nn.Module):
    """``tf.image.random_saturation``: saturation (HSV) times ``U[lower, upper)``, clipped to [0, 1]."""

    def __init__(self, lower: float, upper: float) -> None:
        super().__init__()
        if not 0 <= lower <= upper:
            raise ValueError(f"need 0 <= lower <= upper, got lower={lower}, upper={upper}")
        self.lower, self.upper = float(lower), float(upper)

    def forward(self, x: Tensor) -> Tensor:
        return adjust_saturation_hsv(x, _uniform(self.lower, self.upper))

    def extra_repr(self) -> str:
        return f"lower={self.lower}, upper={self.upper}"


class TFRandomContrast(torch.nn.Module):
    """``tf.image.random_contrast``: per channel ``(x - mean_c) * f + mean_c``, ``f ~ U[lower, upper)``.

    ``mean_c`` is the mean of channel ``c`` over the image (not a grey-scale mean as in
    torchvision); one factor ``f`` for all channels; no clipping.
    """

    def __init__(self, lower: float, upper: float) -> None:
        super().__init__()
        if not 0 <= lower <= upper:
            raise ValueError(f"need 0 <= lower <= upper, got lower={lower}, upper={upper}")
        self.lower, self.upper = float(lower), float(upper)

    def forward(self, x: Tensor) -> Tensor:
        factor = _uniform(self.lower, self.upper)
        mean = x.mean(dim=(-2, -1), keepdim=True)
        return torch.add(mean, x - mean, alpha=factor)

    def extra_repr(self) -> str:
        return f"lower={self.lower}, upper={self.upper}"


class ToFloatImage(torch.nn.Module):
    """uint8 ``[H, W, C]`` (or ``[H, W]``) array/tensor -> float32 ``[C, H, W]`` in ``[0, pixel_range]``.

    With ``pixel_range = 1`` the same numbers as ``torchvision.transforms.ToTensor``
    (pixels / 255), without the PIL round trip; ``pixel_range = 255`` keeps the raw values
    as floats (what DeepOBS' TensorFlow code does).
    """

    def __init__(self, pixel_range: float = 1.0) -> None:
        super().__init__()
        if not pixel_range > 0:
            raise ValueError(f"pixel_range must be positive, got {pixel_range}")
        self.pixel_range = float(pixel_range)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x)
        if x.ndim == 2:
            x = x.unsqueeze(-1)
        x = x.permute(2, 0, 1).float()
        if self.pixel_range != 255.0:
            x = x / 255.0  # bit-identical to ToTensor for pixel_range = 1
            if self.pixel_range != 1.0:
                x = x * self.pixel_range
        return x

    def extra_repr(self) -> str:
        return f"pixel_range={self.pixel_range}"


def cifar_train_transform(pixel_range: float = 1.0) -> Callable[[Tensor], Tensor]:
    """The DeepOBS CIFAR training augmentation (order documented in the module docstring)."""
    return T.Compose(
        [
            ToFloatImage(pixel_range),
            # pad 2 with zeros on every side (tf.image.resize_image_with_crop_or_pad to 36x36)
            # then a random 32x32 window (tf.random_crop)
            T.RandomCrop(32, padding=CIFAR_PAD, fill=0, padding_mode="constant"),
            T.RandomHorizontalFlip(p=0.5),
            TFRandomBrightness(CIFAR_BRIGHTNESS_MAX_DELTA),
            TFRandomSaturation(*CIFAR_SATURATION_RANGE),
            TFRandomContrast(*CIFAR_CONTRAST_RANGE),
            PerImageStandardization(),
        ]
    )


def cifar_eval_transform(pixel_range: float = 1.0) -> Callable[[Tensor], Tensor]:
    """CIFAR test / train-eval preprocessing: per-image standardisation only."""
    return T.Compose([ToFloatImage(pixel_range), PerImageStandardization()])


def fashion_mnist_transform() -> Callable[[Tensor], Tensor]:
    """Fashion-MNIST: pixels / 255 into float32 ``[1, 28, 28]``, no augmentation."""
    return ToFloatImage()
