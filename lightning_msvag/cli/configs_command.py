"""``lightning-msvag configs [--write DIR]``: list or copy the configs that ship with the package."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import List

from ..errors import UserError
from .reporting import UsageError


#: The problem configs and per-method optimizer configs that ship with the package.
PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _configs_root() -> Path:
    """The shipped configs: inside the installed package, or the checkout's ``configs/``."""
    if PACKAGED_CONFIGS.is_dir():
        return PACKAGED_CONFIGS
    return Path(__file__).resolve().parents[2] / "configs"


CONFIGS_USAGE = """usage: lightning-msvag configs [--write DIR]

List the shipped problem configs (configs/*.yaml) and per-method optimizer configs
(configs/optimizers/*.yaml). --write DIR copies them to DIR/configs (never over existing files)."""


def configs_command(argv: List[str]) -> int:
    """``lightning-msvag configs``: list the shipped configs; ``--write DIR`` copies them to DIR/configs."""
    root = _configs_root()
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml"))
    if not argv:
        print("\n".join(names))
        print(f"(in {root}; 'lightning-msvag configs --write .' copies them to ./configs)", file=sys.stderr)
        return 0
    if argv[0] in ("-h", "--help"):
        print(CONFIGS_USAGE)
        return 0
    if argv[0] != "--write" or len(argv) != 2:
        raise UsageError(f"configs takes --write DIR or nothing, got {' '.join(argv)!r}; "
                         "usage: lightning-msvag configs [--write DIR]")
    target = Path(argv[1]) / "configs"
    existing = [n for n in names if (target / n).exists()]
    if existing:
        raise UserError(f"{target} already holds {', '.join(existing)}; not overwriting (remove them first)")
    for name in names:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / name, target / name)
    print(f"wrote {len(names)} configs to {target}")
    return 0
