"""The command line before jsonargparse reads it: ``--optimizer <registry name>`` becomes the
method table's class and arguments (its step size unless ``--optimizer.lr`` is given, with a
notice), ``nan`` step sizes are refused, batch limits written as integers stay integers."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .reporting import UsageError, _say
from .namespace import _class_label, _import_class
from .config_files import _config_files


def _optimizer_classes_by_name() -> Dict[str, type]:
    """Short class names LightningCLI resolves for ``--optimizer``: every imported ``Optimizer`` subclass."""
    from torch.optim import Optimizer

    found: Dict[str, type] = {}
    pending = [Optimizer]
    while pending:
        cls = pending.pop()
        for sub in cls.__subclasses__():
            if not sub.__name__.startswith("_"):
                found.setdefault(sub.__name__, sub)
            pending.append(sub)
    return found


def _optimizer_class(value: str) -> Optional[type]:
    """The class ``--optimizer VALUE`` names (registry name, class name, import path), or None."""
    from ..registry import get_method

    try:
        return get_method(value).cls
    except ValueError:
        pass
    if "." in value:
        return _import_class(value)
    return _optimizer_classes_by_name().get(value)


def _unknown_optimizer(value: str) -> "UsageError":
    from ..registry import available_optimizers

    names = available_optimizers()
    classes = sorted(_optimizer_classes_by_name())
    close = difflib.get_close_matches(value.lower(), names, n=3, cutoff=0.5)
    if not close:  # registry names first; class names only where none is close
        by_lower = {n.lower(): n for n in classes}
        close = [by_lower[c] for c in difflib.get_close_matches(value.lower(), list(by_lower), n=3, cutoff=0.5)]
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return UsageError(f"unknown optimizer {value!r}; {hint}known: {', '.join(names)} "
                      "(or a torch.optim class name such as Adam, or an import path)")


def _configured_optimizer(argv: Sequence[str], before: int) -> Tuple[Optional[str], Any]:
    """(class_path, lr) of the optimizer the ``--config`` files before position ``before`` set."""
    import yaml

    class_path, lr = None, None
    for _, name in _config_files(argv[:before]):
        try:
            data = yaml.safe_load(Path(name).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            continue  # the parser reports it
        optimizer = data.get("optimizer") if isinstance(data, dict) else None
        if isinstance(optimizer, str):
            class_path, lr = optimizer, None
        elif isinstance(optimizer, dict) and optimizer.get("class_path"):
            class_path, lr = optimizer["class_path"], (optimizer.get("init_args") or {}).get("lr")
    return class_path, lr


_LR_OPTIONS = ("--optimizer.lr", "--optimizer.init_args.lr")


def prepare_argv(argv: List[str]) -> List[str]:
    """The command line LightningCLI parses, made from the user's:

    * registry names (``--optimizer m-svag``, ``--optimizer.help m-svag``; any name
      ``--list-optimizers`` prints) become class paths; an unknown name is refused in one line
      with the closest names;
    * ``--optimizer X`` that replaces the config's method without an ``--optimizer.lr`` gets
      X's own starting step size from the method table (``configs/optimizers/<method>.yaml``,
      said in one line), not the config's step size of another method; a class outside the
      table is refused until a step size is given.
    """
    from ..registry import get_method

    out = list(argv)
    for i, token in enumerate(list(out)):
        if token in ("--optimizer", "--optimizer.help") and i + 1 < len(out):
            index, value = i + 1, out[i + 1]
        elif token.startswith(("--optimizer=", "--optimizer.help=")):
            index, value = i, token.split("=", 1)[1]
        else:
            continue
        if value.lstrip().startswith("{") or value in ("null", "None"):
            continue  # a dict / none: jsonargparse's to parse
        cls = _optimizer_class(value)
        if cls is None:
            raise _unknown_optimizer(value)
        try:
            row = get_method(value)
        except ValueError:
            row = None
        resolved = row.class_path if row is not None else value
        out[index] = resolved if index != i else f"{token.split('=', 1)[0]}={resolved}"
        if token.startswith("--optimizer.help"):
            continue
        if row is not None:  # the row's own arguments (m-svag-mb: variance=minibatch), before the user's
            given = {t.split("=", 1)[0] for t in out[index + 1:]}
            extra = [f"--optimizer.{key}={_cli_value(v)}" for key, v in row.init_args.items()
                     if f"--optimizer.{key}" not in given and f"--optimizer.init_args.{key}" not in given]
            out[index + 1:index + 1] = extra
        later = out[i + 1:]
        if any(t.split("=", 1)[0] in _LR_OPTIONS for t in later) or _configured_optimizer(later, len(later))[0]:
            continue  # a step size (or a whole optimizer config) follows
        config_path, config_lr = _configured_optimizer(out, i)
        config_cls = _optimizer_class(config_path) if config_path else None
        if config_cls is None or config_cls is cls:
            continue
        # the row named (svag-mb, not the first row of its class), else the class's row
        method = row if row is not None else next((m for m in _table() if m.cls is cls), None)
        if method is None:
            raise UsageError(
                f"--optimizer {value} replaces the config's {_class_label(config_cls)} whose lr {config_lr} "
                f"is not a step size for it; give one with --optimizer.lr")
        resume = any(t.split("=", 1)[0] == "--ckpt_path" for t in out)  # a resume: the checkpoint's check speaks
        if not resume and _as_float(config_lr) != float(method.default_lr):
            _say(f"--optimizer {value}: lr {method.default_lr} ({method.name}'s starting step size, "
                 f"configs/optimizers/{method.config}.yaml), not the config's {config_lr} for "
                 f"{_class_label(config_cls).split(' ')[0]}; --optimizer.lr sets another")
        out.insert(i + 2 if index != i else i + 1, f"--optimizer.lr={method.default_lr!r}")
    return out


def _as_float(value: Any) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _cli_value(value: Any) -> str:
    """A method-table argument as jsonargparse reads it from the command line."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_cli_value(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


def _table():
    from ..registry import METHODS

    return METHODS


def with_registry_names_resolved(argv: List[str]) -> List[str]:
    """Kept for callers of 0.x: :func:`prepare_argv`."""
    return prepare_argv(argv)


_BATCH_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")


def _integer_batch_limits(argv: List[str]) -> dict:
    """``--trainer.limit_val_batches 1`` means one batch in Lightning (an int), but
    jsonargparse hands ``Union[int, float]`` options over as floats, and ``1.0`` means all
    batches. Integer literals on the command line are given back as ints."""
    limits = {}
    for i, token in enumerate(argv):
        name, _, value = token.partition("=")
        if not value and i + 1 < len(argv):
            value = argv[i + 1]
        key = name[len("--trainer."):] if name.startswith("--trainer.") else ""
        if key in _BATCH_LIMITS and value.strip().isdigit():
            limits[key] = int(value)
    return limits
