"""A server running in a background thread of this process, for ``apply --local``: the same
code path as the real service (gRPC, embedded Ray), no daemon to manage.

It opens no TCP port: it listens on a Unix domain socket (0600) in a fresh private folder
(0700), so no other user's process can reach it, and the client connects to ``unix:<path>``.
The user who runs it is its only caller, so ``local_settings`` opens the roots to what that
user's spec names.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from pathlib import Path
from types import TracebackType

from modelsurgery.server.app import ModelSurgeryServer, ServerSettings
from modelsurgery.server.auth import TOKENS_ENV
from modelsurgery.server.credentials import take_from_environment

SOCKET_NAME = "modelsurgery.sock"
FOLDER_PREFIX = "modelsurgery-local-"
# A Unix socket's path must fit in sockaddr_un.sun_path (108 bytes on Linux, with its NUL).
MAX_SOCKET_PATH = 100


def private_folder() -> Path:
    """A fresh folder only this user can open (mode 0700) whose socket path is short enough:
    under the temp folder ($TMPDIR), else under /tmp when $TMPDIR is too deep."""
    for parent in (None, "/tmp"):
        folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX, dir=parent))
        if len(os.fsencode(folder / SOCKET_NAME)) <= MAX_SOCKET_PATH:
            return folder
        folder.rmdir()
    raise OSError("no temp folder has a path short enough for a Unix socket")


def _base_folders(base: str) -> list[Path]:
    """Where a spec's own base path lives (a folder and what its files link to, or a file's
    folder); nothing for aliases, Hub repositories and stored versions."""
    path = Path(base).expanduser()
    if not base or not path.exists():
        return []
    if not path.is_dir():
        return [path.resolve().parent]
    return [path.resolve(), *(child.resolve().parent for child in path.iterdir())]


def local_settings(store_root: Path, spec_file: Path, base: str) -> ServerSettings:
    """Settings for ``apply --local``: model paths may lie under the spec's own base path, the
    spec file's folder, the current folder or the home's ``models/``; data files under the
    spec file's folder, the current folder or the home's ``data/`` (relative names are looked
    up in that order)."""
    home = store_root.parent
    take_from_environment(TOKENS_ENV)  # unused (only this user reaches the socket); kept from Ray
    shared = [spec_file.resolve().parent, Path(os.getcwd())]
    models = dict.fromkeys([*_base_folders(base), *shared, home / "models"])
    data = dict.fromkeys([*shared, home / "data"])
    return ServerSettings(
        store_root=store_root,
        env_tokens="",
        model_roots=tuple(models),
        data_roots=tuple(data),
    )


class EmbeddedServer:
    def __init__(self, settings: ServerSettings) -> None:
        self._folder = private_folder()
        settings.unix_socket = self._folder / SOCKET_NAME
        self.socket = settings.unix_socket
        self._server = ModelSurgeryServer(settings)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.address = ""

    def __enter__(self) -> EmbeddedServer:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._server.start(), self._loop).result()
        except BaseException:
            self._close()
            raise
        self.address = self._server.address
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close()

    def _close(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._server.stop(), self._loop).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
            shutil.rmtree(self._folder, ignore_errors=True)
