"""The one wrapper of gRPC method handlers, shared by the interceptors that act on every call
(authentication, failure mapping), so that they cover the same handlers in the same way.

grpc.aio calls a handler by its kind: request and response each unary or streaming, and a
streaming response yielded (an async generator) or written with ``context.write`` (a coroutine,
as health's Watch). A wrapper keeps the kind; a synchronous handler is refused, since it would
run outside the guard: unauthenticated, or with its traceback sent to the caller.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
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


def guarded(handler: grpc.RpcMethodHandler, guard: Guard) -> grpc.RpcMethodHandler:
    """``handler`` with each of its calls run inside ``guard(context)``."""
    kind, factory = _KINDS[bool(handler.request_streaming), bool(handler.response_streaming)]
    inner = getattr(handler, kind)

    async def yielding(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with guard(context):
            async for response in inner(request, context):
                yield response

    async def returning(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with guard(context):
            return await inner(request, context)

    if inspect.isasyncgenfunction(inner):
        call: Callable[..., Any] = yielding
    elif inspect.iscoroutinefunction(inner):
        call = returning
    else:
        raise TypeError(f"a synchronous {kind} handler would run unguarded; write it async")
    return factory(call, handler.request_deserializer, handler.response_serializer)
