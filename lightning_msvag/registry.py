"""The method table: every optimizer the project offers, described once.

Each :class:`Method` row says what an optimizer is (its class, its place in the paper's 2×2
family, its variance-adapted sibling's base), how to build it by name, and how to start
using it (the config's starting step size, the benchmark's default step-size grid). Everything
that lists methods is derived from :data:`METHODS`: :func:`build_optimizer`,
:func:`available_optimizers` (``lightning-msvag --list-optimizers``), the names
``--optimizer`` accepts, ``configs/optimizers/*.yaml`` (written by :func:`write_optimizer_configs`:
``python -c "import lightning_msvag.registry as r; r.write_optimizer_configs('configs/optimizers')"``;
a test checks that the committed files match), the ``reproduce benchmark`` runner and the
tests, which are parametrized from the table (as torch's are from ``optim_db``).

>>> from lightning_msvag import build_optimizer
>>> opt = build_optimizer("m-svag", model.parameters(), lr=0.1)   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from torch.optim import Optimizer

from .rule import UpdateRule

__all__ = ["Method", "METHODS", "available_optimizers", "build_optimizer", "get_method", "write_optimizer_configs"]


@dataclass(frozen=True)
class Method:
    """One optimizer of the project (docs/algorithm.md §1).

    Args:
        name: canonical registry name, the paper's spelling (``"m-svag"``).
        class_path: import path of the optimizer class (what LightningCLI's ``--optimizer`` takes).
        summary: one line for listings and the generated config's comment.
        base: the method this one adds variance adaptation to (M-SVAG → M-SGD, Adam → M-SSD),
            for the paper's "variance adaptation helps" comparison.
        default_lr: the starting step size in ``configs/optimizers/<config>.yaml``.
        default_grid: the benchmark's default step-size grid, ``lo:hi:n`` (log-spaced).
        in_paper_benchmark: one of the four methods of the paper's §6 comparison.
        init_args: further constructor arguments written into the config (Adam's β's, ε,
            ``variance="minibatch"``). The benchmark runner passes only the class to
            ``--optimizer``, so rows whose ``init_args`` change the rule have no ``default_grid``
            (they are not benchmark methods until the runner passes them).
        config: file stem in ``configs/optimizers``.
        family: only for a class without a :class:`~lightning_msvag.rule.UpdateRule`
            (``torch.optim``'s Adam and SGD): its place in the paper's 2×2 family,
            ``(sign, variance_adaptation)``. The project's classes answer from their ``rule``.
    """

    name: str
    class_path: str
    summary: str
    base: Optional[str]
    default_lr: float
    default_grid: Optional[str]
    in_paper_benchmark: bool
    config: str
    init_args: Dict[str, Any] = field(default_factory=dict)
    family: Optional[Tuple[bool, bool]] = None

    @property
    def cls(self) -> type:
        module, _, name = self.class_path.rpartition(".")
        return getattr(importlib.import_module(module), name)

    @property
    def rule(self) -> Optional[UpdateRule]:
        """The :class:`~lightning_msvag.rule.UpdateRule` the row's optimizer runs (its class's, with the
        row's ``init_args`` applied, e.g. ``variance="minibatch"``); ``None`` for ``torch.optim`` classes."""
        rule_for = getattr(self.cls, "rule_for", None)
        if rule_for is not None:
            return rule_for(**self.init_args)
        return getattr(self.cls, "rule", None)

    @property
    def needs_batch_variance(self) -> bool:
        """Needs the mini-batch variance estimate each step (``BatchVarianceCallback``, docs/algorithm.md §1.1)."""
        rule = self.rule
        return rule is not None and rule.needs_batch_variance

    @property
    def sign(self) -> bool:
        """Updates along a sign (paper Fig. 1, bottom row)."""
        rule = self.rule
        return rule.sign if rule is not None else self.family[0]

    @property
    def variance_adaptation(self) -> bool:
        """Scales coordinates by a variance-adaptation factor γ (Adam: its implicit one)."""
        rule = self.rule
        return rule.variance_adaptation if rule is not None else self.family[1]

    @property
    def uses_beta(self) -> bool:
        """Keeps a moving average, i.e. the project's one constant ``beta`` matters."""
        rule = self.rule
        return rule is not None and (rule.needs_first_moment or rule.needs_second_moment)


#: The table. Order = the order of every listing.
METHODS: Tuple[Method, ...] = (
    Method("m-sgd", "lightning_msvag.MSGD", "M-SGD: bias-corrected momentum SGD, θ ← θ − α m",
           base=None, default_lr=0.1, default_grid="0.01:10:7", in_paper_benchmark=True, config="msgd"),
    Method("m-ssd", "lightning_msvag.MSSD", "M-SSD: sign descent on the momentum, θ ← θ − α sign(m~)",
           base=None, default_lr=0.001, default_grid="1e-5:1e-2:7", in_paper_benchmark=True, config="mssd"),
    Method("m-svag", "lightning_msvag.MSVAG", "M-SVAG: variance-adapted momentum SGD, θ ← θ − α γ ⊙ m (paper §4)",
           base="m-sgd", default_lr=0.1, default_grid="0.01:10:7", in_paper_benchmark=True, config="msvag"),
    Method("svag", "lightning_msvag.SVAG", "SVAG: variance adaptation on the raw gradient, θ ← θ − α γ ⊙ g",
           base="sgd", default_lr=0.1, default_grid="0.01:10:7", in_paper_benchmark=False, config="svag"),
    Method("m-ssd-va", "lightning_msvag.MSSDVA",
           "M-SSD-VA: M-SSD with variance adaptation, θ ← θ − α γ^s ⊙ sign(m~), γ^s = erf[(√2 η)⁻¹] (paper §3.1)",
           base="m-ssd", default_lr=0.001, default_grid="1e-5:1e-2:7", in_paper_benchmark=False, config="mssdva",
           init_args={"factor": "erf"}),
    Method("m-ssd-va-sqrt", "lightning_msvag.MSSDVA",
           "M-SSD-VA with Adam's factor γ^s = (1 + η²)^(-1/2) (paper Fig. 3)",
           base="m-ssd", default_lr=0.001, default_grid="1e-5:1e-2:7", in_paper_benchmark=False,
           config="mssdva_sqrt", init_args={"factor": "sqrt"}),
    Method("m-svag-mb", "lightning_msvag.MSVAG",
           "M-SVAG with the mini-batch variance estimate (paper §4.1); needs BatchVarianceCallback",
           base="m-sgd", default_lr=0.1, default_grid="0.01:10:7", in_paper_benchmark=False, config="msvag_mb",
           init_args={"variance": "minibatch"}),
    Method("svag-mb", "lightning_msvag.SVAG",
           "SVAG with the mini-batch variance estimate (paper §4.1); needs BatchVarianceCallback",
           base="sgd", default_lr=0.1, default_grid="0.01:10:7", in_paper_benchmark=False, config="svag_mb",
           init_args={"variance": "minibatch"}),
    Method("ssd", "lightning_msvag.SSD", "SSD: sign descent on the raw gradient, θ ← θ − α sign(g) (paper §2, §5)",
           base=None, default_lr=0.001, default_grid="1e-5:1e-2:7", in_paper_benchmark=False, config="ssd"),
    Method("adam", "torch.optim.Adam", "Adam with the paper's settings: β1 = 0.9, β2 = 0.999, ε = 1e-8",
           base="m-ssd", default_lr=0.001, default_grid="1e-5:1e-2:7", in_paper_benchmark=True, config="adam",
           init_args={"betas": [0.9, 0.999], "eps": 1e-8}, family=(True, True)),
    Method("sgd", "torch.optim.SGD", "plain SGD (no momentum), θ ← θ − α g, for reference",
           base=None, default_lr=0.1, default_grid=None, in_paper_benchmark=False, config="sgd", family=(False, False)),
)


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


_LOOKUP = {_key(m.name): m for m in METHODS}


def available_optimizers() -> List[str]:
    """The registry's canonical names, in table order (m-sgd, m-ssd, m-svag, svag, adam, sgd)."""
    return [m.name for m in METHODS]


def get_method(name: str) -> Method:
    """The table row called ``name`` (case-insensitive, hyphen optional); ``ValueError`` if unknown."""
    if not isinstance(name, str) or _key(name) not in _LOOKUP:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(available_optimizers())}")
    return _LOOKUP[_key(name)]


def build_optimizer(name: str, params: Iterable, **kwargs) -> Optimizer:
    """Construct the optimizer called ``name`` on ``params``.

    ``name`` is case-insensitive and the hyphen is optional (``"M-SVAG"``, ``"msvag"``).
    ``kwargs`` go to the optimizer (``lr``, ``beta``, ...) over the table's ``init_args``
    (Adam: the paper's β's and ε). Unknown names raise ``ValueError`` listing the known ones.
    """
    method = get_method(name)
    return method.cls(params, **{**_constructor_args(method), **kwargs})


def _constructor_args(method: Method) -> Dict[str, Any]:
    args = dict(method.init_args)
    if "betas" in args:
        args["betas"] = tuple(args["betas"])
    return args


def _yaml_value(value: Any) -> str:
    """A number or list of numbers as YAML 1.1 reads it back (``1.0e-08``, not ``1e-08``)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, str) and value.isidentifier():
        return value  # a plain word (``minibatch``, ``erf``) is a YAML string as it stands
    text = repr(value)
    mantissa, _, exponent = text.partition("e")
    if exponent and "." not in mantissa:
        text = f"{mantissa}.0e{exponent}"
    return text


def optimizer_config_text(method: Method) -> str:
    """The YAML of ``configs/optimizers/<method.config>.yaml`` (stack it after a problem config)."""
    lines = [
        f"# {method.summary}.",
        "# Generated from the method table in lightning_msvag/registry.py (docs/algorithm.md §1);",
        "# the step size is a starting point, not a tuned value (docs/problems.md §5).",
        "optimizer:",
        f"  class_path: {method.class_path}",
        "  init_args:",
        f"    lr: {_yaml_value(method.default_lr)}",
    ]
    if method.uses_beta:
        lines.append("    beta: 0.9")
    for key, value in method.init_args.items():
        lines.append(f"    {key}: {_yaml_value(value)}")
    return "\n".join(lines) + "\n"


def write_optimizer_configs(folder: Path) -> List[Path]:
    """Write one ``<config>.yaml`` per method into ``folder``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for method in METHODS:
        path = folder / f"{method.config}.yaml"
        path.write_text(optimizer_config_text(method), encoding="utf-8")
        written.append(path)
    return written

