"""The base class of errors a user can fix, which the ``lightning-msvag`` command reports in one line.

Anything raised as a :class:`UserError` describes a mistake in the user's input, files or
data (a missing data set, a file with the wrong checksum, ...), not a bug: the command
prints its message as ``lightning-msvag: error: <message>`` and exits with status 1
(docs/long_runs.md, README; a mistake in the command line itself is a usage error, status 2). Code outside the library, e.g. the problem packages'
data modules, subclasses it so that the command needs to know nothing about them.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """An error whose message tells the user what to fix; reported by the command in one line."""
