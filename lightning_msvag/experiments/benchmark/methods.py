"""The methods the benchmark compares, derived from the method table (:data:`lightning_msvag.registry.METHODS`).

The benchmark (:mod:`lightning_msvag.experiments.benchmark`: its ``config``, ``plan`` and
``claims`` modules) reads these views: the CLI's ``--methods`` choices and ``--grid`` defaults, the ``fit
--optimizer`` class of each run, the sign-based / non-sign groups of the claims table. A
method enters them by having a ``default_grid`` in the table; nothing here is hand-kept.
"""

from __future__ import annotations

from typing import Dict, Tuple

from ...registry import METHODS

__all__ = ["METHOD_CLASSES", "DEFAULT_GRIDS", "DEFAULT_METHODS", "SIGN_BASED", "NON_SIGN", "VARIANCE_ADAPTED_OF"]

_BENCHMARKABLE = tuple(m for m in METHODS if m.default_grid is not None)

#: Method name -> optimizer class path for LightningCLI's ``--optimizer``.
METHOD_CLASSES: Dict[str, str] = {m.name: m.class_path for m in _BENCHMARKABLE}
#: Default grids (``lo:hi:n``, log-spaced). Sign-based steps move each weight by ~α.
DEFAULT_GRIDS: Dict[str, str] = {m.name: m.default_grid for m in _BENCHMARKABLE}
#: The paper's §6 comparison: M-SGD, M-SSD, M-SVAG, Adam.
DEFAULT_METHODS: Tuple[str, ...] = tuple(m.name for m in _BENCHMARKABLE if m.in_paper_benchmark)
_PAPER = tuple(m for m in _BENCHMARKABLE if m.in_paper_benchmark)
#: The paper's two groups of its §6 comparison (§6.2): the update direction is a sign
#: (M-SSD, Adam) or not (M-SGD, M-SVAG).
SIGN_BASED: Tuple[str, ...] = tuple(m.name for m in _PAPER if m.sign)
NON_SIGN: Tuple[str, ...] = tuple(m.name for m in _PAPER if not m.sign)
#: Variance-adapted method -> its base method (the same direction without the adaptation),
#: among the §6 methods: M-SVAG -> M-SGD, Adam -> M-SSD.
VARIANCE_ADAPTED_OF: Dict[str, str] = {m.name: m.base for m in _PAPER if m.base in DEFAULT_METHODS}
