"""Errors the app reports as one line and exit status 2 (never a traceback)."""

from __future__ import annotations

__all__ = ["AppError", "CheckpointError", "DataError", "DownloadError", "UsageError"]


class AppError(Exception):
    """Base class: a problem with the user's input; ``str(error)`` is the whole message."""


class UsageError(AppError, ValueError):
    """A bad command-line argument or combination of arguments."""


class DataError(AppError, ValueError):
    """A data set that is missing, unreadable, truncated or inconsistent."""


class DownloadError(DataError):
    """A download that failed (network, HTTP status or checksum)."""


class CheckpointError(AppError, ValueError):
    """A checkpoint that cannot be read or does not fit the run."""
