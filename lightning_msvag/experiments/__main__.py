"""``python -m lightning_msvag.experiments <experiment> ...`` = ``lightning-msvag reproduce <experiment> ...``."""

import sys

from . import main

sys.exit(main())
