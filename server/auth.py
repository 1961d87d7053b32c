"""Bearer-token authentication: tokens come from a file (one per line, ``name:token`` or just
``token``) or the ``MODELSURGERY_TOKENS`` environment variable (comma separated)."""

from __future__ import annotations

import contextvars
import hmac
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

TOKENS_ENV = "MODELSURGERY_TOKENS"
UNAUTHENTICATED_METHODS = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
_current_caller: contextvars.ContextVar[str] = contextvars.ContextVar(
    "modelsurgery_caller", default="anonymous"
)


def parse_tokens(lines: list[str]) -> dict[str, str]:
    """token -> caller name. A line without a name gets ``caller-<n>``."""
    tokens: dict[str, str] = {}
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        if not sep:
            name, token = f"caller-{number}", line
        if not token.strip():
            raise ValueError(f"empty token on line {number}")
        tokens[token.strip()] = name.strip()
    return tokens


def load_tokens(tokens_file: Path | None) -> dict[str, str]:
    lines: list[str] = []
    if tokens_file is not None:
        lines.extend(tokens_file.read_text(encoding="utf-8").splitlines())
    lines.extend(t for t in os.environ.get(TOKENS_ENV, "").split(",") if t.strip())
    return parse_tokens(lines)


def current_caller() -> str:
    """The authenticated caller of the RPC being served (``anonymous`` without tokens)."""
    return _current_caller.get()


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without a valid ``authorization: Bearer <token>`` with UNAUTHENTICATED."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self._tokens = tokens

    def _caller(self, metadata: tuple[tuple[str, Any], ...]) -> str | None:
        for key, value in metadata:
            if key == "authorization" and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                if scheme.lower() != "bearer":
                    return None
                for known, name in self._tokens.items():
                    if hmac.compare_digest(known.encode(), token.strip().encode()):
                        return name
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if method.startswith(UNAUTHENTICATED_METHODS) or handler is None:
            return handler
        caller = self._caller(tuple(handler_call_details.invocation_metadata or ()))
        if caller is None:
            return _reject(handler)
        return _with_caller(handler, caller)


def _with_caller(handler: grpc.RpcMethodHandler, caller: str) -> grpc.RpcMethodHandler:
    """The same handler, run with the caller bound for ``current_caller``."""
    if handler.unary_unary is not None:
        inner_unary = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            _current_caller.set(caller)
            return await inner_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            _current_caller.set(caller)
            async for response in inner_stream(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer
        )
    raise TypeError("client-streaming RPCs are not part of the modelsurgery API")


def _reject(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        yield  # pragma: no cover

    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(
        unary, handler.request_deserializer, handler.response_serializer
    )
