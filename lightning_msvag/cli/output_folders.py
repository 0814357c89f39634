"""Where a run writes: ``--trainer.default_root_dir`` carried to the configs' logger, and an
output folder that is a file or not writable refused in one line before anything is written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

from ..errors import UserError
from .namespace import _get


def _logger_run_root(config: Any) -> Tuple[Optional[Any], Optional[Path]]:
    """(the logger's init_args, ``<save_dir>/<name>``) for a TensorBoard/CSV logger of the
    config; ``(None, None)`` for other or no loggers. The run folders are the version folders
    below the root: ``<save_dir>/<name>/version_N``."""
    logger = _get(_get(config, "trainer"), "logger")
    if isinstance(logger, (list, tuple)):
        logger = logger[0] if len(logger) == 1 else None
    class_path = str(_get(logger, "class_path", ""))
    if not class_path.endswith(("TensorBoardLogger", "CSVLogger")):
        return None, None
    init = _get(logger, "init_args")
    if init is None:
        return None, None
    save_dir = Path(str(_get(init, "save_dir", ".")))
    name = _get(init, "name", "lightning_logs")
    return init, (save_dir / str(name)) if name else save_dir


def _follow_default_root_dir(config: Any, argv: Sequence[str]) -> None:
    """``--trainer.default_root_dir DIR``: the config's logger writes below DIR too (its relative
    ``save_dir`` is taken inside DIR), unless the command line gives the logger's ``save_dir``."""
    root = _get(_get(config, "trainer"), "default_root_dir")
    if not root or any(a.startswith(("--trainer.logger.init_args.save_dir", "--trainer.logger.save_dir")) for a in argv):
        return
    init, _ = _logger_run_root(config)
    if init is None:
        return
    save_dir = Path(str(_get(init, "save_dir", ".")))
    if not save_dir.is_absolute():
        init.save_dir = str(Path(str(root)) / save_dir)


def _check_output_folders(config: Any) -> None:
    """The folders the run will write (the logger's, ``default_root_dir``): one line naming the path
    if one cannot be made or written — a file in the way, no permission — before anything starts."""
    _, run_root = _logger_run_root(config)
    folders = [Path(str(_get(_get(config, "trainer"), "default_root_dir", ".")))] + ([run_root] if run_root else [])
    for folder in folders:
        existing = folder.absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise UserError(f"output folder {folder}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"output folder {folder}: {existing} is not writable")
