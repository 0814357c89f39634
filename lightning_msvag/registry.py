"""Build the paper's optimizers by name (case-insensitive, with or without the hyphen).

>>> from lightning_msvag import build_optimizer
>>> opt = build_optimizer("m-svag", model.parameters(), lr=0.1)   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List

import torch
from torch.optim import Optimizer

from .optimizers import MSGD, MSSD, MSVAG, SVAG


def _paper_adam(params: Iterable, lr: float = 1e-3, **kwargs) -> torch.optim.Adam:
    """torch.optim.Adam with the paper's settings: β1 = 0.9, β2 = 0.999, ε = 1e-8 (docs/algorithm.md §1)."""
    kwargs.setdefault("betas", (0.9, 0.999))
    kwargs.setdefault("eps", 1e-8)
    return torch.optim.Adam(params, lr=lr, **kwargs)


def _sgd(params: Iterable, lr: float = 1e-3, **kwargs) -> torch.optim.SGD:
    """Plain torch.optim.SGD (pass ``momentum=...`` for heavy-ball momentum)."""
    return torch.optim.SGD(params, lr=lr, **kwargs)


#: Canonical name -> factory. Canonical names are the paper's spellings.
_REGISTRY: Dict[str, Callable[..., Optimizer]] = {
    "m-sgd": MSGD,
    "m-ssd": MSSD,
    "m-svag": MSVAG,
    "svag": SVAG,
    "adam": _paper_adam,
    "sgd": _sgd,
}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


_LOOKUP = {_key(name): name for name in _REGISTRY}


def available_optimizers() -> List[str]:
    """The registry's canonical names: m-sgd, m-ssd, m-svag, svag, adam, sgd."""
    return list(_REGISTRY)


def build_optimizer(name: str, params: Iterable, **kwargs) -> Optimizer:
    """Construct the optimizer called ``name`` on ``params``.

    ``name`` is case-insensitive and the hyphen is optional (``"M-SVAG"``, ``"msvag"``).
    ``kwargs`` go to the optimizer (``lr``, ``beta``, ...). Unknown names raise
    ``ValueError`` listing the known ones.
    """
    if not isinstance(name, str) or _key(name) not in _LOOKUP:
        raise ValueError(
            f"unknown optimizer {name!r}; known: {', '.join(available_optimizers())}"
        )
    return _REGISTRY[_LOOKUP[_key(name)]](params, **kwargs)
