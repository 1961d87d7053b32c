"""Authentication and failure mapping wrap handlers with one guard (issue 28), so every handler
kind gets both alike: a refused caller never reaches the handler, the caller is bound, and what
escapes gets its status for the caller. Before, auth broke handlers that stream with
``context.write`` and refused client streaming, and failure mapping left client streaming bare."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from modelsurgery.proto.spec import SpecError
from modelsurgery.server.app import ServerSettings
from modelsurgery.server.auth import BearerTokenInterceptor, Caller, Role, current_caller
from modelsurgery.server.failures import FailureInterceptor
from modelsurgery.server.guard import guarded

SERVICE = "modelsurgery.test.Guarded"
TOKENS = {"writer-token-0123456789": Caller("wendy", Role.WRITER)}
TOKENS["reader-token-0123456789"] = Caller("rita", Role.READER)


def _refusal() -> SpecError:
    """A caller's error (INVALID_ARGUMENT, its own message) that names the bound caller."""
    return SpecError("caller", current_caller())


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise _refusal()


async def _yields(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"first"
    raise _refusal()


async def _writes(request: bytes, context: grpc.aio.ServicerContext) -> None:
    await context.write(b"first")
    raise _refusal()


async def _client_streams(requests: AsyncIterator[bytes], context: Any) -> bytes:
    [_ async for _ in requests]
    raise _refusal()


async def _bidi(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for _ in requests:
        yield b"first"
    raise _refusal()


HANDLERS = {
    "Unary": grpc.unary_unary_rpc_method_handler(_unary),
    "Yields": grpc.unary_stream_rpc_method_handler(_yields),
    "Writes": grpc.unary_stream_rpc_method_handler(_writes),
    "ClientStreams": grpc.stream_unary_rpc_method_handler(_client_streams),
    "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
}


def _call(
    tmp_path: Path, method: str, token: str | None
) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """Call ``method`` behind both interceptors, installed as app.py installs them."""
    settings = ServerSettings(store_root=tmp_path / "store", data_roots=(tmp_path / "data",))

    async def scenario() -> tuple[grpc.StatusCode, str, list[bytes]]:
        server = grpc.aio.server(
            interceptors=[BearerTokenInterceptor(TOKENS), FailureInterceptor(settings)]
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, HANDLERS),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        handler, path = HANDLERS[method], f"/{SERVICE}/{method}"
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        received: list[bytes] = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                kind = ("stream" if handler.request_streaming else "unary") + "_"
                kind += "stream" if handler.response_streaming else "unary"
                request: Any = iter([b"x"]) if handler.request_streaming else b"x"
                call = getattr(channel, kind)(path)(request, metadata=metadata)
                if handler.response_streaming:
                    async for item in call:
                        received.append(item)
                else:
                    received.append(await call)
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or "", received
        finally:
            await server.stop(None)
        raise AssertionError(f"{method} succeeded")

    return asyncio.run(scenario())


@pytest.mark.parametrize("method", HANDLERS)
def test_every_handler_kind_is_authenticated_then_guarded(tmp_path: Path, method: str) -> None:
    assert _call(tmp_path, method, None)[:2] == (
        grpc.StatusCode.UNAUTHENTICATED,
        "missing or invalid bearer token",
    )
    assert _call(tmp_path, method, "reader-token-0123456789")[:2] == (
        grpc.StatusCode.PERMISSION_DENIED,
        f"{method} needs the writer role; caller 'rita' is a reader",
    )
    assert _call(tmp_path, method, "writer-token-0123456789") == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "caller: wendy",
        [b"first"] if HANDLERS[method].response_streaming else [],
    )


def test_a_synchronous_handler_is_refused() -> None:
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    with pytest.raises(TypeError, match="synchronous unary_unary handler"):
        guarded(handler, lambda context: None)  # type: ignore[arg-type,return-value]
