"""The one wrapper of gRPC method handlers, shared by the interceptors that act on every call
(authentication, failure mapping), so that they cover the same handlers in the same way.

grpc.aio calls a handler by its kind: request and response each unary or streaming, and a
streaming response yielded (an async generator) or written with ``context.write`` (a coroutine,
as health's Watch). A wrapper keeps the kind; a synchronous handler is refused, since it would
run outside the guard: unauthenticated, or with its traceback sent to the caller.

grpc.aio decodes a request before any guard runs and answers bytes that do not decode with
UNKNOWN; with ``checks_requests`` the wrapper decodes them into a marker instead, and raises
``UndecodableRequest`` for it inside the guard (after authentication), where it can be answered.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import grpc

# Entered around each call; it may abort the call, or answer what the call raises.
Guard = Callable[[grpc.aio.ServicerContext], AbstractAsyncContextManager[None]]

_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


class UndecodableRequest(Exception):
    """A request whose bytes are not the method's message: the caller's fault."""


@dataclass(frozen=True)
class _Undecodable:
    problem: str


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # protobuf's DecodeError, or a custom decoder's
            return _Undecodable(str(exc) or type(exc).__name__)

    return decode


def _checked(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise UndecodableRequest(f"the request does not decode ({request.problem})")
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _checked(request)


def guarded(
    handler: grpc.RpcMethodHandler, guard: Guard, *, checks_requests: bool = False
) -> grpc.RpcMethodHandler:
    """``handler`` with each of its calls run inside ``guard(context)``; with
    ``checks_requests``, a request that does not decode raises ``UndecodableRequest`` there."""
    streaming = bool(handler.request_streaming)
    kind, factory = _KINDS[streaming, bool(handler.response_streaming)]
    inner = getattr(handler, kind)
    deserializer = handler.request_deserializer
    checks = checks_requests and deserializer is not None
    if checks:
        deserializer = _tolerant(deserializer)

    def checked(request: Any) -> Any:
        if not checks:
            return request
        return _checked_stream(request) if streaming else _checked(request)

    async def yielding(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with guard(context):
            async for response in inner(checked(request), context):
                yield response

    async def returning(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with guard(context):
            return await inner(checked(request), context)

    if inspect.isasyncgenfunction(inner):
        call: Callable[..., Any] = yielding
    elif inspect.iscoroutinefunction(inner):
        call = returning
    else:
        raise TypeError(f"a synchronous {kind} handler would run unguarded; write it async")
    return factory(call, deserializer, handler.response_serializer)
