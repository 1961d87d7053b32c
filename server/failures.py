"""A server interceptor that turns exceptions escaping a servicer into a status for the caller.

Without it grpc.aio answers UNKNOWN with the exception's text, which for a Ray call is the
worker's whole traceback (PID, node IP, ANSI colours). Here an error of a known kind, raised in
the servicer or in a worker (Ray re-raises it as a ``RayTaskError`` that subclasses it and keeps
it as ``cause``), gets its status and its own message, scrubbed of server paths; anything else
is INTERNAL with a short reference, and the full exception goes to the server log under that
reference. Explicit aborts pass untouched. A few failures whose own message would not tell the
caller what to do (a full disk, a corrupt weights file, a chat template the sandbox refuses) get
a status and a message written here.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import grpc
from jinja2.exceptions import SecurityError, TemplateError
from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError
from safetensors import SafetensorError

from modelsurgery.checkpoints import AliasConflictError, InvalidAliasError, VersionNotFoundError
from modelsurgery.models.errors import ModelReferenceError
from modelsurgery.proto.spec import SpecError
from modelsurgery.server.disk import is_disk_full
from modelsurgery.server.errors import abort
from modelsurgery.server.guard import UndecodableRequest, guarded
from modelsurgery.server.redact import ServerPlaces, scrub

log = logging.getLogger("modelsurgery.server")
StatusCode = grpc.StatusCode

# Errors whose messages are written for the caller, wherever they are raised.
DOMAIN_ERRORS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (VersionNotFoundError, StatusCode.NOT_FOUND),
    (AliasConflictError, StatusCode.FAILED_PRECONDITION),
    (InvalidAliasError, StatusCode.INVALID_ARGUMENT),
    (ModelReferenceError, StatusCode.INVALID_ARGUMENT),
    (SpecError, StatusCode.INVALID_ARGUMENT),
    (UndecodableRequest, StatusCode.INVALID_ARGUMENT),
)
# Built-in errors a worker raises on a request's input or size; raised in the servicer itself
# they are bugs (INTERNAL).
WORKER_ERRORS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (ValueError, StatusCode.INVALID_ARGUMENT),
    (MemoryError, StatusCode.RESOURCE_EXHAUSTED),
    (TimeoutError, StatusCode.DEADLINE_EXCEEDED),
)
WORKER_GONE = (RayActorError, WorkerCrashedError)


class Explained(Exception):
    """A message written here for the caller, in place of the failure's own."""


def _explained(cause: BaseException, from_worker: bool) -> tuple[StatusCode, Explained] | None:
    """The status and message of a failure whose own message would not help the caller."""
    if is_disk_full(cause):
        # The message would name the file being written; the caller can only wait or ask.
        return StatusCode.RESOURCE_EXHAUSTED, Explained(
            "the server is out of disk space; try again later or ask its operator to free space"
        )
    if isinstance(cause, SafetensorError):
        return StatusCode.FAILED_PRECONDITION, Explained(
            f"a weights file is corrupt (SafetensorError: {cause}); the server's operator can "
            "find it with `modelsurgery versions verify`"
        )
    if from_worker and isinstance(cause, SecurityError):
        return StatusCode.FAILED_PRECONDITION, Explained(
            f"the model's chat template does something the sandbox refuses ({cause}); send the "
            "prompts without the chat template (chat false)"
        )
    if from_worker and isinstance(cause, TemplateError):
        return StatusCode.INVALID_ARGUMENT, Explained(
            f"the model's chat template refused the prompts ({type(cause).__name__}: {cause})"
        )
    return None


def caller_status(exc: BaseException) -> tuple[grpc.StatusCode, BaseException] | None:
    """The status an escaped exception answers with and the exception whose message is shown
    (a worker error's cause, never Ray's wrapper); None for an unexpected one."""
    if isinstance(exc, WORKER_GONE):
        return StatusCode.UNAVAILABLE, exc
    from_worker = isinstance(exc, RayTaskError)
    cause = getattr(exc, "cause", None) if from_worker else exc
    if cause is None:
        return None
    for kind, code in DOMAIN_ERRORS:
        if isinstance(cause, kind):
            return code, cause
    explained = _explained(cause, from_worker)
    if explained is not None:
        return explained
    if from_worker:
        if type(cause).__name__ == "OutOfMemoryError":  # torch's, without importing torch
            return StatusCode.RESOURCE_EXHAUSTED, cause
        for kind, code in WORKER_ERRORS:
            if isinstance(cause, kind):
                return code, cause
    return None


class FailureInterceptor(grpc.aio.ServerInterceptor):
    """Answers every exception a servicer lets escape with a status written for the caller."""

    def __init__(self, places: ServerPlaces) -> None:
        self._places = places

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        return guarded(
            handler, lambda context: self._answering(context, method), checks_requests=True
        )

    @asynccontextmanager
    async def _answering(
        self, context: grpc.aio.ServicerContext, method: str
    ) -> AsyncIterator[None]:
        """Abort the call with a status for the caller when it raises; explicit aborts pass."""
        try:
            yield
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            known = caller_status(exc)
            if known is None:
                reference = secrets.token_hex(4)
                log.exception(
                    "unexpected error in %s (reference %s)",
                    method,
                    reference,
                    extra={"method": method, "reference": reference},
                )
                await abort(context, StatusCode.INTERNAL, f"internal error (reference {reference})")
            code, shown = known
            if shown is exc and isinstance(exc, WORKER_GONE):
                log.error("worker ended during %s", method, exc_info=exc)
                message = "the worker serving this call ended; try again"
            else:
                log.info("%s answered %s: %r", method, code.name, shown)
                message = scrub(str(shown), self._places)
            await abort(context, code, message)
