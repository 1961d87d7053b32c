"""gRPC errors with the offending field attached as a google.rpc BadRequest detail."""

from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

FIELD_METADATA_KEY = "modelsurgery-field"


def _status(code: grpc.StatusCode, message: str, field: str | None) -> grpc.Status:
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    if field:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
                ]
            )
        )
        status.details.append(detail)
    return rpc_status.to_status(status)


async def abort(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    field: str | None = None,
) -> NoReturn:
    """End the RPC with ``code``; ``field`` names the request field at fault."""
    # abort (not abort_with_status, which does the same) so the gRPC instrumentation records
    # the status code instead of UNKNOWN.
    status = _status(code, message, field)
    await context.abort(code, status.details, status.trailing_metadata)
    raise AssertionError("abort returned")
