"""Where the generated kernels keep what they build (shared by both backends)."""

from __future__ import annotations

import os


def cache_dir() -> str:
    """``$LIGHTNING_MSVAG_CACHE``, else ``$XDG_CACHE_HOME/lightning_msvag`` or ``~/.cache/lightning_msvag``."""
    explicit = os.environ.get("LIGHTNING_MSVAG_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lightning_msvag")
