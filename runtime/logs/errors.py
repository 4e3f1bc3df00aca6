"""Errors of the interaction log, and the one place an `sqlite3` error becomes one of them.

The kind comes from SQLite's result code (`sqlite_errorcode`), never from the text of
the message. The whole tree is documented in `outpost/runtime/errors.py`.

What this module must not do: map any other library's errors (each boundary maps
its own: httpx in escalation/cloud.py).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from outpost.manifests.errors import OutpostError

# Primary result codes (the low byte of an extended code), from sqlite3.h.
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_IOERR, SQLITE_FULL, SQLITE_TOOBIG = 5, 6, 10, 13, 18


class LogUnavailable(OutpostError):
    """The interaction log could not be written or read."""

    code = "log_unavailable"

    def __init__(self, message: str, path: str, **data: Any) -> None:
        super().__init__(message, path=path, **data)
        self.path = path


class LogLocked(LogUnavailable):
    """Another process held the log's database past the busy timeout."""

    code = "log_locked"


class LogDiskFull(LogUnavailable):
    """The log's filesystem (or the process's file-size limit) has no room left."""

    code = "log_disk_full"


def from_sqlite(exc: BaseException, path: Path) -> BaseException:
    """An sqlite3 error as Outpost's error tree (anything else unchanged)."""
    if not isinstance(exc, sqlite3.Error):
        return exc
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if code is not None else None
    if primary in (SQLITE_BUSY, SQLITE_LOCKED):
        return LogLocked(f"the log {path} is locked by another process ({exc})", str(path))
    # An I/O error on write is what a file-size limit or a vanished disk looks like.
    if primary in (SQLITE_FULL, SQLITE_IOERR, SQLITE_TOOBIG):
        return LogDiskFull(f"no room to write the log {path} ({exc})", str(path))
    return LogUnavailable(f"the log {path} failed: {exc}", str(path))
