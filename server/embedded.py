"""A server running in a background thread of this process, for ``apply --local``: the same
code path as the real service (gRPC on a loopback port, embedded Ray), no daemon to manage."""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType

from modelsurgery.server.app import ModelSurgeryServer, ServerSettings


class EmbeddedServer:
    def __init__(self, settings: ServerSettings) -> None:
        settings.host, settings.port = "127.0.0.1", 0
        self._server = ModelSurgeryServer(settings)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.address = ""

    def __enter__(self) -> EmbeddedServer:
        self._thread.start()
        port = asyncio.run_coroutine_threadsafe(self._server.start(), self._loop).result()
        self.address = f"127.0.0.1:{port}"
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        asyncio.run_coroutine_threadsafe(self._server.stop(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
