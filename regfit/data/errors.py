"""The one exception of the data layer: what is wrong with the data files, and how to fix it."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(RuntimeError):
    """Data files are missing, corrupt or could not be downloaded; the message names the fix.

    A ``RuntimeError`` (not ``OSError``): the ``regfit`` command reports it as one paragraph
    without a traceback, like a mistake in the command line.
    """
