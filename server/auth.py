"""Bearer-token authentication and roles.

Tokens come from a file (one per line) or the ``MODELSURGERY_TOKENS`` environment variable
(comma separated). A line is ``name:token`` (a writer), ``name:role:token`` (role ``reader``,
``writer`` or ``admin``) or a bare ``token`` (a writer named ``caller-<line>``). Every token has
at least 16 characters, so a bare token that contains ``:`` fails at load instead of silently
becoming its tail. Each call runs with its caller bound (``current_identity``); a call whose
method needs a higher role than its caller's is PERMISSION_DENIED before it reaches a servicer.
"""

from __future__ import annotations

import contextvars
import hmac
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import grpc

from modelsurgery.server.guard import guarded

TOKENS_ENV = "MODELSURGERY_TOKENS"
MIN_TOKEN_CHARS = 16
UNAUTHENTICATED_METHODS = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


class Role(StrEnum):
    READER = "reader"
    WRITER = "writer"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_RANKS = {Role.READER: 0, Role.WRITER: 1, Role.ADMIN: 2}

# Methods that change nothing; every other method of the API needs a writer (a method added
# later is closed to readers until it is listed here).
READ_METHODS = frozenset(
    {
        "/modelsurgery.v1.JobService/GetJob",
        "/modelsurgery.v1.JobService/ListJobs",
        "/modelsurgery.v1.JobService/WatchJob",
        "/modelsurgery.v1.JobService/PredictConcepts",
        "/modelsurgery.v1.CheckpointService/ListVersions",
        "/modelsurgery.v1.CheckpointService/GetVersion",
        "/modelsurgery.v1.CheckpointService/Diff",
        "/modelsurgery.v1.CheckpointService/GetAlias",
        "/modelsurgery.v1.CheckpointService/ListAliases",
        "/modelsurgery.v1.CheckpointService/DownloadVersion",
        "/modelsurgery.v1.CheckpointService/GetArtifact",
        "/modelsurgery.v1.CheckpointService/Generate",
        "/modelsurgery.v1.CheckpointService/EvaluateVersion",
    }
)


@dataclass(frozen=True)
class Caller:
    """Who makes a call: the token's name and its role."""

    name: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


# Without tokens the server listens on loopback only and serves one user: that user may do
# everything.
ANONYMOUS = Caller("anonymous", Role.ADMIN)
_current: contextvars.ContextVar[Caller] = contextvars.ContextVar(
    "modelsurgery_caller", default=ANONYMOUS
)


class TokenFileError(ValueError):
    """A token line the server refuses to start with; the message names the line."""


def required_role(method: str) -> Role:
    return Role.READER if method in READ_METHODS else Role.WRITER


def _parse_line(line: str, number: int) -> tuple[str, Caller]:
    parts = line.split(":")
    if len(parts) >= 3 and parts[1].strip() in {r.value for r in Role}:
        name, role, token = parts[0], Role(parts[1].strip()), ":".join(parts[2:])
    elif len(parts) >= 2:
        name, role, token = parts[0], Role.WRITER, ":".join(parts[1:])
    else:
        name, role, token = f"caller-{number}", Role.WRITER, line
    name, token = name.strip(), token.strip()
    if not name:
        raise TokenFileError(f"token line {number}: empty caller name before ':'")
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenFileError(
            f"token line {number}: the token has {len(token)} characters, at least "
            f"{MIN_TOKEN_CHARS} are needed (a bare token must not contain ':'; "
            "write name:token or name:role:token)"
        )
    return token, Caller(name, role)


def parse_tokens(lines: list[str]) -> dict[str, Caller]:
    """token -> caller. Blank lines and ``#`` comments are skipped."""
    tokens: dict[str, Caller] = {}
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        token, caller = _parse_line(line, number)
        if token in tokens:
            raise TokenFileError(f"token line {number}: the same token is given twice")
        tokens[token] = caller
    return tokens


def take_env_tokens() -> str:
    """``MODELSURGERY_TOKENS``, removed from the environment so that no child process (Ray's
    workers, the log relay) inherits it; ``""`` when unset."""
    return os.environ.pop(TOKENS_ENV, "")


def load_tokens(tokens_file: Path | None, env_tokens: str = "") -> dict[str, Caller]:
    """The tokens of ``tokens_file`` then of ``env_tokens`` (the comma-separated value of
    ``MODELSURGERY_TOKENS``), lines numbered on from the file's."""
    lines: list[str] = []
    if tokens_file is not None:
        lines.extend(tokens_file.read_text(encoding="utf-8").splitlines())
    lines.extend(t for t in env_tokens.split(",") if t.strip())
    return parse_tokens(lines)


def current_identity() -> Caller:
    """The caller of the RPC being served (``anonymous``, an admin, without tokens)."""
    return _current.get()


def current_caller() -> str:
    """The name of the RPC's caller (``anonymous`` without tokens)."""
    return _current.get().name


def current_role() -> Role:
    return _current.get().role


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without a valid ``authorization: Bearer <token>`` with UNAUTHENTICATED,
    and calls to a method the caller's role does not allow with PERMISSION_DENIED."""

    def __init__(self, tokens: Mapping[str, Caller]) -> None:
        self._tokens = dict(tokens)

    def _caller(self, metadata: tuple[tuple[str, Any], ...]) -> Caller | None:
        for key, value in metadata:
            if key == "authorization" and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                if scheme.lower() != "bearer":
                    return None
                for known, caller in self._tokens.items():
                    if hmac.compare_digest(known.encode(), token.strip().encode()):
                        return caller
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
        return guarded(handler, lambda context: _calling_as(caller, method, context))


@asynccontextmanager
async def _calling_as(
    caller: Caller | None, method: str, context: grpc.aio.ServicerContext
) -> AsyncIterator[None]:
    """Run the call with ``caller`` bound for ``current_identity``; refuse it without a caller,
    or when the caller's role is below the method's."""
    if caller is None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
    needed = required_role(method)
    if not caller.role.allows(needed):
        rpc = method.rpartition("/")[2]
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{rpc} needs the {needed} role; caller {caller.name!r} is a {caller.role}",
        )
    _current.set(caller)
    yield
