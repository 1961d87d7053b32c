"""The server's secrets kept from other processes: tokens taken out of its environment for good,
and embedded Ray's token in a file only its user reads.

``os.environ.pop`` (unsetenv) keeps a variable from the children, but the kernel still shows the
environment the process started with in /proc/<pid>/environ, to the same user's processes, root
and any tool that collects process details; that copy lives in the process's own memory, so it
is overwritten here. Ray (2.5x and later) turns token authentication on for a cluster it starts
and writes ``~/.ray/auth_token`` with the umask's mode, world-readable under the usual 022.
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger("modelsurgery.server")

PROC_STAT = Path("/proc/self/stat")
# proc(5): env_start and env_end are fields 50 and 51; after the command name, which may hold
# spaces but ends with ")", field 3 is the first.
ENV_START_FIELD = 50 - 3
RAY_AUTH_ENVS = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def take_from_environment(name: str) -> str:
    """The value of ``name`` (``""`` when unset), removed from the environment children inherit
    and erased from the one /proc shows."""
    value = os.environ.pop(name, "")
    _erase_initial(name)
    return value


def _erase_initial(name: str) -> None:
    """Overwrite the value of ``name`` in the environment block this process started with
    (Linux; elsewhere there is none to read)."""
    try:
        fields = PROC_STAT.read_text().rpartition(")")[2].split()
        start, end = int(fields[ENV_START_FIELD]), int(fields[ENV_START_FIELD + 1])
    except (OSError, IndexError, ValueError):
        return
    if not 0 < start < end:
        return
    prefix = name.encode() + b"="
    offset = start
    for entry in ctypes.string_at(start, end - start).split(b"\0"):
        if entry.startswith(prefix):
            ctypes.memset(offset + len(prefix), ord("x"), len(entry) - len(prefix))
        offset += len(entry) + 1


def private_ray_token() -> None:
    """Before embedded Ray starts: its token file (``~/.ray/auth_token``) written with mode
    0600 if absent, made 0600 if not; nothing when the operator chose the token (environment)
    or turned token authentication off."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        return
    if any(os.environ.get(env) for env in RAY_AUTH_ENVS):
        return
    path = Path.home() / ".ray" / "auth_token"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            try:
                path.chmod(0o600)
            except OSError as exc:
                log.warning("cannot make Ray's token file %s private: %s", path, exc)
            else:
                log.warning(
                    "Ray's token file %s was readable by others; now private (if others could "
                    "reach this machine, replace the token)",
                    path,
                )
        return
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_hex(32))  # what ``ray get-auth-token --generate`` writes
