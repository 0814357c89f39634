"""``python -m lightning_msvag`` is the ``lightning-msvag`` command."""

import sys

from .command import main

sys.exit(main())
