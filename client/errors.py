"""Typed SDK errors carrying the gRPC status and the request field at fault."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from modelsurgery.proto.job_state import JobState
from modelsurgery.proto.spec import SpecError, SpecTooLarge, request_field


class ModelSurgeryError(Exception):
    """A failed call: ``code`` is the gRPC status, ``field`` the offending field (or None)."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.field = field


class InvalidArgument(ModelSurgeryError):
    pass


class NotFound(ModelSurgeryError):
    pass


class FailedPrecondition(ModelSurgeryError):
    pass


class Unauthenticated(ModelSurgeryError):
    pass


class PermissionDenied(ModelSurgeryError):
    """The caller's role, or ownership (another caller's job, a protected alias), forbids it."""


class ResourceExhausted(ModelSurgeryError):
    pass


class DeadlineExceeded(ModelSurgeryError):
    pass


class Unavailable(ModelSurgeryError):
    pass


class WaitTimeout(DeadlineExceeded, TimeoutError):
    """``wait(..., timeout=...)`` ran out before the job ended (the job itself goes on)."""

    def __init__(self, job_id: str, timeout: float, message: str | None = None) -> None:
        super().__init__(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            message or f"job {job_id} did not end within {timeout:g} s",
            "timeout",
        )
        self.job_id = job_id
        self.timeout = timeout


class InvalidSpec(InvalidArgument, ValueError):
    """A spec the client refused before sending it, as the server would have: the same
    message and field path (``spec.operations[0].heads``). Still a ValueError, as the spec
    errors the SDK raised before."""


class SpecOverBound(ResourceExhausted, ValueError):
    """A spec over a size bound, refused before sending it (RESOURCE_EXHAUSTED, as the server)."""


def spec_refusal(error: SpecError) -> ModelSurgeryError:
    """The typed error the server answers a spec with: INVALID_ARGUMENT, or RESOURCE_EXHAUSTED
    for one over a size bound, naming the field as the server does."""
    if isinstance(error, SpecTooLarge):
        code, kind = grpc.StatusCode.RESOURCE_EXHAUSTED, SpecOverBound
    else:
        code, kind = grpc.StatusCode.INVALID_ARGUMENT, InvalidSpec
    return kind(code, str(error), request_field(error.field))


class JobFailed(Exception):
    """``wait(..., raise_on_failure=True)`` on a job that ended FAILED or CANCELLED."""

    def __init__(self, job: object, state: JobState | str, error: str) -> None:
        self.state = JobState.from_name(state)
        super().__init__(f"job ended {self.state}: {error}")
        self.job = job
        self.error = error


_BY_CODE: dict[grpc.StatusCode, type[ModelSurgeryError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def from_rpc_error(error: grpc.RpcError) -> ModelSurgeryError:
    """Translate a grpc error (sync or aio) into the typed exception, with its field."""
    code = error.code()
    message = error.details() or code.name
    field = None
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                if bad_request.field_violations:
                    field = bad_request.field_violations[0].field
    return _BY_CODE.get(code, ModelSurgeryError)(code, message, field)
