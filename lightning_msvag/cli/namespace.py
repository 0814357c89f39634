"""Reading the parsed configuration (jsonargparse namespaces or plain dicts) and the class paths it names."""

from __future__ import annotations

import inspect
from typing import Any, List, Optional



def _get(namespace: Any, key: str, default: Any = None) -> Any:
    try:
        value = namespace.get(key, default) if hasattr(namespace, "get") else getattr(namespace, key, default)
    except (KeyError, AttributeError):
        return default
    return default if value is None else value


def _plain(value: Any) -> Any:
    """A config or hyperparameter value in comparable form (tuples as lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _import_class(path: str) -> Optional[type]:
    module, _, name = str(path).rpartition(".")
    if not module:
        return None
    try:
        import importlib

        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _class_label(cls: type) -> str:
    """``m-svag (lightning_msvag.MSVAG)`` for the table's classes, else the import path."""
    from ..registry import METHODS

    for method in METHODS:
        try:
            if method.cls is cls:
                return f"{method.name} ({method.class_path})"
        except (ImportError, AttributeError):  # pragma: no cover
            continue
    return f"{cls.__module__}.{cls.__qualname__}"


def _init_parameters(class_path: str) -> List[str]:
    cls = _import_class(class_path)
    if cls is None:
        return []
    try:
        return [n for n, p in inspect.signature(cls.__init__).parameters.items()
                if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    except (TypeError, ValueError):
        return []
