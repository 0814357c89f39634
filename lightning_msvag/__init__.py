"""lightning-msvag: the optimizers of "Dissecting Adam" (Balles & Hennig, ICML 2018).

M-SGD, M-SSD, M-SVAG, SVAG and SSD as ``torch.optim.Optimizer`` subclasses, a name registry,
and (in submodules) PyTorch Lightning callbacks and a CLI. See docs/algorithm.md for the formulas.
"""

from .functional import variance_adaptation_factor
from .optimizers import MSGD, MSSD, MSSDVA, MSVAG, SSD, SVAG, DissectedOptimizer
from .registry import available_optimizers, build_optimizer
from .rule import UpdateRule, bias_correction, variance_ratio

__version__ = "0.2.0"


def __getattr__(name: str):
    # the callback needs pytorch_lightning: import it on first use, so that plain-PyTorch
    # users of the optimizers don't pay for Lightning (the CLI imports it eagerly)
    if name == "VarianceAdaptationMonitor":
        from .callbacks import VarianceAdaptationMonitor

        return VarianceAdaptationMonitor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MSGD",
    "MSSD",
    "MSSDVA",
    "MSVAG",
    "SVAG",
    "SSD",
    "DissectedOptimizer",
    "UpdateRule",
    "VarianceAdaptationMonitor",
    "available_optimizers",
    "bias_correction",
    "build_optimizer",
    "variance_adaptation_factor",
    "variance_ratio",
    "__version__",
]
