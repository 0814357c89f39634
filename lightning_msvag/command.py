"""The ``lightning-msvag`` command: LightningCLI's subcommands (:mod:`lightning_msvag.cli`) plus
``reproduce`` (:mod:`lightning_msvag.experiments`).

Kept apart from :mod:`lightning_msvag.cli` so that imports run one way: the experiments'
runner starts Lightning runs through ``cli``, and this module sits above both.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from . import cli
from .experiments import main as reproduce


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["reproduce"]:
        return cli.run_guarded(lambda: reproduce(argv[1:]))
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
