"""Small I/O helpers shared by the experiments: atomic JSON/CSV writes (``lightning_msvag._io``:
they follow the umask), output folders."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .._io import atomic_write_text

__all__ = ["prepare_out", "write_json", "read_json", "write_csv", "jsonable"]


def prepare_out(out: "str | Path") -> Path:
    """Create the output folder (and parents) and return it as a ``Path``."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays and non-finite floats into plain JSON values.

    NaN and ±inf become the strings ``"nan"``, ``"inf"``, ``"-inf"`` so the file stays
    strict JSON (readable by any parser).
    """
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if np is not None:
        if isinstance(value, np.ndarray):
            return [jsonable(v) for v in value.tolist()]
        if isinstance(value, np.generic):
            value = value.item()
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: "str | Path", data: Any) -> Path:
    """Write ``data`` as indented, strict JSON, atomically."""
    path = Path(path)
    atomic_write_text(path, json.dumps(jsonable(data), indent=2, sort_keys=False) + "\n")
    return path


def read_json(path: "str | Path") -> Any:
    """Read a JSON file (``None`` if it is missing or unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_csv(path: "str | Path", header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """Write a CSV with a header row, atomically (floats with ``repr`` precision)."""
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([repr(float(v)) if isinstance(v, float) else v for v in row])  # np.float64 too
    path = Path(path)
    atomic_write_text(path, buf.getvalue())
    return path
