"""What happens to ``--ckpt_path``: ``last`` resolves to the newest ``last.ckpt`` of the run
(a configured ``ModelCheckpoint``'s ``dirpath``, the logger's version folders, or
``<default_root_dir>/checkpoints``), and the resumed run continues that version folder so the
TensorBoard run goes on (docs/long_runs.md)."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, List, Optional, Tuple

from .reporting import UsageError, _say
from .namespace import _get
from .output_folders import _logger_run_root


def _checkpoint_folders(config: Any) -> Tuple[List[Path], Optional[str]]:
    """Where this run's checkpoints live: a configured ModelCheckpoint's ``dirpath``, else the
    logger's version folders (``<save_dir>/<name>/*/checkpoints``), else
    ``<default_root_dir>/checkpoints`` (Lightning's own choices, docs/long_runs.md)."""
    trainer = _get(config, "trainer")
    for callback in _get(trainer, "callbacks", []) or []:
        if str(_get(callback, "class_path", "")).endswith("ModelCheckpoint"):
            dirpath = _get(_get(callback, "init_args"), "dirpath")
            if dirpath:
                return [Path(str(dirpath))], str(dirpath)
    init, root = _logger_run_root(config)
    if root is not None:
        version = _get(init, "version")
        if version is not None:  # the user fixed the run's folder (e.g. to the SLURM job id)
            folder = root / (f"version_{version}" if isinstance(version, int) else str(version)) / "checkpoints"
            return [folder], str(folder)
        return sorted(root.glob("*/checkpoints")), str(root / "version_*" / "checkpoints")
    folder = Path(str(_get(trainer, "default_root_dir", "."))) / "checkpoints"
    if _get(trainer, "logger") is False:
        return [folder], str(folder)
    return [], None


def _resolve_last(config: Any, subcommand: str) -> Optional[str]:
    """``--ckpt_path last``: the newest ``last*.ckpt`` of this run's checkpoint folders.

    None there: ``fit`` says so in one line and starts from scratch (the same command line
    starts a job and resumes it when a scheduler requeues it); ``validate``/``test``/``predict``
    refuse, as there is nothing to evaluate.
    """
    folders, pattern = _checkpoint_folders(config)
    if pattern is None:
        return "last"  # a logger or checkpoint layout of the user's: Lightning's own search
    found = [p for folder in folders for p in folder.glob("last*.ckpt") if p.is_file()]
    if found:
        return str(max(found, key=lambda p: (p.stat().st_mtime, str(p))))
    if subcommand != "fit":
        raise UsageError(f"--ckpt_path last: no last.ckpt in {pattern}; nothing to {subcommand} "
                         "(give the checkpoint's path with --ckpt_path)")
    _say(f"--ckpt_path last: no last.ckpt in {pattern} yet; training starts from scratch")
    return None


def _continue_logger_folder(config: Any, ckpt_path: Path) -> None:
    """A checkpoint in ``<save_dir>/<name>/<version>/checkpoints`` continues that version folder:
    the resumed run (or its validate/test) writes into the same TensorBoard run instead of
    opening ``version_<N+1>``, and its checkpoints go beside the one it resumed."""
    init, root = _logger_run_root(config)
    if init is None or _get(init, "version") is not None:
        return  # no such logger, or the user chose the version
    folder = ckpt_path.resolve().parent
    if folder.name != "checkpoints" or folder.parent.parent != root.resolve():
        return
    version = folder.parent.name
    match = re.fullmatch(r"version_(\d+)", version)
    init.version = int(match.group(1)) if match else version
    # continuing the folder is the point: Lightning's "exists and is not empty" says nothing here
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .*" + re.escape(os.path.join(version, "checkpoints"))
                            + " exists and is not empty")
