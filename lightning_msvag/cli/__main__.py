"""``python -m lightning_msvag.cli``: the command without ``reproduce``."""

import sys

from . import main

sys.exit(main())
