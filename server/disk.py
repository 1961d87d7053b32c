"""Whether a failure is a full disk: the one condition every writer of the home (the job table,
the store, exports) answers the same way, as "retry later", never as an internal error."""

from __future__ import annotations

import errno
import sqlite3

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """An OSError of a full disk or quota, or SQLite's SQLITE_FULL ("database or disk is
    full"), which carries no errno."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL_ERRNOS
    return isinstance(exc, sqlite3.OperationalError) and "is full" in str(exc)
