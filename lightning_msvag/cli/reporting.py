"""One-line errors: what the command reports and how it exits.

Usage errors (:class:`UsageError`) exit 2 like argparse's; errors a user can fix in values or
files (:data:`USER_ERRORS`) exit 1; both are printed by global rank zero only.
``LIGHTNING_MSVAG_TRACEBACK=1`` shows the traceback instead."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Callable, Optional

from lightning_fabric.utilities.exceptions import MisconfigurationException

from ..errors import UserError



#: Set to 1 to see the traceback of an error that the command otherwise reports in one line.
TRACEBACK_ENV = "LIGHTNING_MSVAG_TRACEBACK"


class UsageError(ValueError):
    """A command-line mistake (unknown option, name or file, a value of the wrong type);
    reported in one line with exit status 2, as argparse's usage errors."""


#: Exceptions that describe a mistake in the user's input or data, not a bug. Data modules
#: (the project's ``datamodules`` or a user's) raise :class:`~lightning_msvag.errors.UserError`.
USER_ERRORS = (ValueError, FileNotFoundError, UserError, MisconfigurationException)


def _global_rank() -> int:
    from pytorch_lightning.utilities import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def _say(message: str) -> None:
    """One line on stderr from global rank zero (every DDP rank parses the command line)."""
    if _global_rank() == 0:
        print(f"lightning-msvag: {message}", file=sys.stderr, flush=True)


def _innermost_message(error: BaseException) -> str:
    """The error's message; for jsonargparse's "does not validate against any of the Union
    subtypes" wrapper, the error of the class that was meant (not the ``None`` alternative)."""
    text = str(error)
    if "Union subtypes" in text and "Errors:" in text:
        reasons = [
            line.strip()[2:]
            for line in text.split("Errors:", 1)[1].splitlines()
            if line.strip().startswith("- ") and "NoneType" not in line
        ]
        if reasons:
            text = "; ".join(reasons)
    return " ".join(text.split()) or type(error).__name__


def _report(error: BaseException) -> int:
    """One line on stderr (rank zero only) naming the error; exit status 2 for a
    :class:`UsageError`, else 1."""
    usage = isinstance(error, UsageError)
    if _global_rank() == 0:
        message = _innermost_message(error)
        print(f"lightning-msvag: error: {message}", file=sys.stderr)
        if not usage:
            print(f"(set {TRACEBACK_ENV}=1 to see the traceback)", file=sys.stderr)
    return 2 if usage else 1


class _DropAdvertisements(logging.Filter):
    """Lightning's "💡 Tip: try installing ..." lines advertise services; they tell a user
    of this command nothing about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


def _quiet_library_noise() -> None:
    """Silence messages a user of this command cannot act on (none concerns their run)."""
    # pytorch-lightning 2.6 on torch >= 2.10 calls a deprecated torch pytree API
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    # LightningCLI 2.6 uses jsonargparse APIs that jsonargparse >= 4.49 deprecates
    warnings.filterwarnings(
        "ignore", message=r"\s*(skip_none parameter|``ArgumentParser.add_instantiator``|``instantiate_classes``) was deprecated"
    )
    # the command hands LightningCLI its own command line (registry names resolved)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropAdvertisements())


def run_guarded(command: Callable[[], Optional[int]]) -> int:
    """Run ``command`` the way every subcommand runs: library noise silenced, a user error
    (:data:`USER_ERRORS`) reported in one line with exit status 1 (2 for a command-line
    :class:`UsageError`), Ctrl-C as 130;
    ``LIGHTNING_MSVAG_TRACEBACK=1`` re-raises instead."""
    show_traceback = os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    _quiet_library_noise()
    try:
        return command() or 0
    except KeyboardInterrupt:
        if show_traceback:
            raise
        return 130
    except Exception as error:
        if show_traceback or not isinstance(error, USER_ERRORS):
            raise
        return _report(error)
