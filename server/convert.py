"""Conversions from job-table records and store manifests to API messages."""

from __future__ import annotations

import json
import re
from datetime import datetime

from google.protobuf import struct_pb2, timestamp_pb2

from modelsurgery.checkpoints import Manifest
from modelsurgery.proto.spec import stored_spec_to_proto
from modelsurgery.server import job_table as jt
from modelsurgery.v1 import checkpoints_pb2, jobs_pb2

# A page token is an offset: ASCII digits only (str.isdigit also takes '²'), small enough for
# SQLite's 64-bit OFFSET.
PAGE_TOKEN = re.compile(r"[0-9]{1,18}")


def timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def job_to_proto(job: jt.JobRecord) -> jobs_pb2.Job:
    message = jobs_pb2.Job(
        id=job.id,
        request_id=job.request_id,
        spec=stored_spec_to_proto(job.spec),
        state=job.state.to_proto(),
        version_id=job.version_id or "",
        metrics=job.metrics,
        error=job.error,
        attempts=job.attempts,
        caller=job.caller,
        cancel_requested=job.cancel_requested,
        previous_attempt=job.previous_attempt,
        gates=[
            jobs_pb2.GateResult(
                metric=g["metric"],
                condition=g["condition"],
                value=float(g["value"]) if g["value"] is not None else 0.0,
                has_value=g["value"] is not None,
                passed=bool(g["passed"]),
            )
            for g in job.gates
        ],
    )
    for name in ("created", "started", "finished"):
        value = timestamp(getattr(job, name))
        if value is not None:
            getattr(message, name).CopyFrom(value)
    return message


def event_to_proto(event: jt.EventRecord) -> jobs_pb2.JobEvent:
    fields = struct_pb2.Struct()
    fields.update(json.loads(json.dumps(event.fields, default=str)))
    message = jobs_pb2.JobEvent(
        job_id=event.job_id,
        seq=event.seq,
        kind=event.kind,
        state=event.state.to_proto(),
        message=event.message,
        fields=fields,
    )
    message.time.CopyFrom(timestamp(event.time))
    return message


def version_to_proto(manifest: Manifest) -> checkpoints_pb2.Version:
    message = checkpoints_pb2.Version(
        id=manifest.id,
        parent_id=manifest.parent or "",
        root_reference=manifest.root.reference,
        root_digest=manifest.root.digest,
        methods=[str(op.get("method", "")) for op in manifest.operations],
        metrics={k: float(v) for k, v in manifest.metrics.items()},
        manifest_json=manifest.model_dump_json(),
        changed_tensors=len(manifest.tensors) if manifest.parent else 0,
    )
    created = datetime.fromisoformat(manifest.created)
    message.created.CopyFrom(timestamp(created.timestamp()))
    return message
