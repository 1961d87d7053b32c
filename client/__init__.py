"""Python SDK (sync ``Client`` and ``AsyncClient``) and the ``modelsurgery`` CLI."""

from modelsurgery.client.aio import AsyncClient
from modelsurgery.client.errors import (
    FailedPrecondition,
    InvalidArgument,
    JobFailed,
    ModelSurgeryError,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
)
from modelsurgery.client.sdk import Client

__all__ = [
    "AsyncClient",
    "Client",
    "FailedPrecondition",
    "InvalidArgument",
    "JobFailed",
    "ModelSurgeryError",
    "NotFound",
    "ResourceExhausted",
    "Unauthenticated",
]
