"""``--config FILE``: which files a command line names, and one line for a file that is not UTF-8 or not YAML."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .reporting import UsageError


def _config_files(argv: Sequence[str]) -> List[Tuple[int, str]]:
    files = []
    for i, token in enumerate(argv):
        if token in ("--config", "-c") and i + 1 < len(argv):
            files.append((i, argv[i + 1]))
        elif token.startswith("--config="):
            files.append((i, token.split("=", 1)[1]))
    return files


def _existing_config_files(argv: List[str]) -> List[Path]:
    """The files of ``--config FILE`` on the command line that exist."""
    return [Path(name) for _, name in _config_files(argv) if Path(name).is_file()]


def _check_config_file(path: Path) -> None:
    """A config file that is not UTF-8 or not YAML: one line with the file and where (exit 2),
    before jsonargparse reads it without its name."""
    import yaml

    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise UsageError(f"config {path}, line {line}: not UTF-8 text ({error.reason}, byte {raw[error.start]:#04x}); "
                         "save it as UTF-8") from None
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UsageError(f"config {path}{where}: not valid YAML ({problem})") from None


def _key_in_files(key: str, files: Sequence[Path]) -> Optional[Path]:
    """The config file (the last, as for values) that holds the dotted ``key``."""
    import yaml

    parts = key.split(".")
    for path in reversed(list(files)):
        try:
            node = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            continue
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and parts[-1] in node:
            return path
    return None
