"""``python -m lightning_msvag`` is the ``lightning-msvag`` command."""

import sys

from .cli import main

sys.exit(main())
