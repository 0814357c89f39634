"""The ``lightning-msvag`` command."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import __version__, available_optimizers


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-msvag",
        description="The 'Dissecting Adam' optimizer family for PyTorch Lightning.",
    )
    parser.add_argument("--version", action="version", version=f"lightning-msvag {__version__}")
    parser.add_argument("--list-optimizers", action="store_true", help="print the registry's names")
    args = parser.parse_args(argv)
    if args.list_optimizers:
        print("\n".join(available_optimizers()))
    else:
        parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
