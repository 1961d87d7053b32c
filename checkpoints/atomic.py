"""Crash-safe writes: temp file in the store, fsync, rename over the target, fsync the folder.

A reader sees either no file or the whole file. Temp files carry the writer's host and pid so
:func:`remove_orphans` can delete those of writers that died without touching live ones.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path) -> None:
    """Create ``path`` (and parents) durably: each new entry's parent folder is fsynced."""
    if path.is_dir():
        return
    ensure_dir(path.parent)
    with contextlib.suppress(FileExistsError):
        path.mkdir()
    fsync_dir(path.parent)


def _temp_name() -> str:
    return f"{os.getpid()}@{socket.gethostname()}@{uuid.uuid4().hex}{TMP_SUFFIX}"


def atomic_write(path: Path, data: bytes | Sequence[bytes | memoryview], tmp_dir: Path) -> None:
    """Write ``data`` (or its parts, in order: a header and a view of a tensor's memory, never
    joined into one copy) to ``path`` so that a crash leaves the old file (or none) or the new
    one."""
    ensure_dir(path.parent)
    tmp = tmp_dir / _temp_name()
    try:
        with open(tmp, "xb") as f:
            for part in [data] if isinstance(data, bytes) else data:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_orphan(path: Path, host: str, max_age_s: float, now: float) -> bool:
    parts = path.name.removesuffix(TMP_SUFFIX).split("@")
    if len(parts) == 3 and parts[1] == host and parts[0].isdigit():
        return not _process_alive(int(parts[0]))
    try:
        return now - path.stat().st_mtime > max_age_s
    except FileNotFoundError:
        return False


def remove_orphans(tmp_dir: Path, max_age_s: float) -> list[Path]:
    """Delete temp files whose writer is gone: on this host, a dead pid; elsewhere, old age."""
    host, now = socket.gethostname(), time.time()
    removed = []
    for path in tmp_dir.glob(f"*{TMP_SUFFIX}"):
        if _is_orphan(path, host, max_age_s, now):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed
