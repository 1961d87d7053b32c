"""Python SDK (sync ``Client`` and ``AsyncClient``) and the ``modelsurgery`` CLI."""

from modelsurgery.client.aio import AsyncClient
from modelsurgery.client.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    InvalidSpec,
    JobFailed,
    ModelSurgeryError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    WaitTimeout,
)
from modelsurgery.client.sdk import Client
from modelsurgery.proto.job_state import JobState

__all__ = [
    "AsyncClient",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "InvalidSpec",
    "JobFailed",
    "JobState",
    "ModelSurgeryError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "WaitTimeout",
]
