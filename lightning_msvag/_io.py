"""Atomic file writes that follow the user's umask (one writer for the library and the data modules).

A file is written to ``<name>.<random>.part`` beside its destination and renamed into place
(``os.replace``), so readers, concurrent processes included, never see half a file. The
temporary file is created with mode 0666 and the kernel applies the umask, as for every other
file the project writes (PNGs, logs): ``tempfile.mkstemp`` would force 0600 and leave results
and data unreadable to colleagues, and reading the umask with ``os.umask`` would briefly change
it for every thread of the process.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, List

__all__ = ["atomic_open", "atomic_write_text"]


def _make_parents(folder: Path) -> List[Path]:
    """Create ``folder`` and its missing parents; return the ones created, deepest first."""
    created: List[Path] = []
    current = folder
    while not current.exists() and current != current.parent:
        created.append(current)
        current = current.parent
    folder.mkdir(parents=True, exist_ok=True)
    return created


def _create_part_file(path: Path) -> "tuple[int, str]":
    """A new, unique ``<name>.<random>.part`` file beside ``path``, opened for writing, mode 0666 & ~umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = str(path.parent / f"{path.name}.{secrets.token_hex(6)}.part")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue


@contextmanager
def atomic_open(path: "str | os.PathLike", mode: str = "wb", **kwargs) -> Iterator[IO]:
    """Open a temporary file for ``path``; on a clean exit it replaces ``path`` in one step.

    ``mode`` is ``"wb"`` or ``"w"`` (``kwargs`` go to :func:`os.fdopen`, e.g. ``encoding``).
    If the block raises, the temporary file is removed and so are the folders this call
    created for it, so a failed write (a download without network) leaves no trace.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes only ('w' or 'wb'), got mode {mode!r}")
    path = Path(path)
    created = _make_parents(path.parent)
    fd, tmp = _create_part_file(path)
    done = False
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
        os.replace(tmp, path)  # readers never see half a file
        done = True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)  # our own temporary file, never a user's file
        if not done:
            for folder in created:  # deepest first; only the empty ones this call made
                try:
                    folder.rmdir()
                except OSError:
                    break


def atomic_write_text(path: "str | os.PathLike", text: str) -> None:
    """Write ``text`` (UTF-8, newlines untranslated) to ``path`` atomically."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
