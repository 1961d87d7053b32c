"""Conversions from job-table records and store manifests to API messages."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import types
import typing
from datetime import datetime
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2
from pydantic import BaseModel

from modelsurgery.checkpoints import Manifest
from modelsurgery.editing.registry import config_class
from modelsurgery.proto import limits
from modelsurgery.proto.spec import stored_spec_to_proto
from modelsurgery.server import job_table as jt
from modelsurgery.v1 import checkpoints_pb2, jobs_pb2

# A page token is an offset: ASCII digits only (str.isdigit also takes '²'), small enough for
# SQLite's 64-bit OFFSET.
PAGE_TOKEN = re.compile(r"[0-9]{1,18}")
# An operation's list shown as a summary when a job is too large to show whole: lists whose
# JSON is longer than this.
SUMMARISED_LIST_BYTES = 1024


def summary(values: list[Any]) -> dict[str, Any]:
    """What stands for a list that is not shown: how many items, and the sha256 of their
    canonical JSON (to compare with a copy of the data)."""
    canonical = json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return {"count": len(values), "sha256": hashlib.sha256(canonical.encode()).hexdigest()}


def _summarised_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A stored spec with each operation's long lists (facts, examples, ...) summarised."""
    operations = [
        {
            name: summary(value)
            if isinstance(value, list) and len(json.dumps(value)) > SUMMARISED_LIST_BYTES
            else value
            for name, value in op.items()
        }
        for op in spec.get("operations", [])
    ]
    return {**spec, "operations": operations}


def _bare_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A stored spec reduced to its base and its operations' methods."""
    operations = [{"method": op.get("method", "")} for op in spec.get("operations", [])]
    return {**spec, "operations": operations, "gates": {}}


def timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def job_to_proto(job: jt.JobRecord) -> jobs_pb2.Job:
    """The job as the API shows it. A row too large for one message (a spec stored whole by
    an earlier release) is shown with its long lists summarised, else with its operations'
    methods alone, so one row never fails a GetJob or a ListJobs page."""
    message = _job_message(job)
    for shorten in (_summarised_spec, _bare_spec):
        if message.ByteSize() <= limits.LIST_RESPONSE_BYTES:
            break
        message.spec.CopyFrom(stored_spec_to_proto(shorten(job.spec)))
    return message


def _job_message(job: jt.JobRecord) -> jobs_pb2.Job:
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
        base_version=job.base_version,
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


def _is_record_list(annotation: Any) -> bool:
    """``list[Model]`` (or an optional one) for a pydantic ``Model``: a list of records."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_record_list(arg) for arg in typing.get_args(annotation))
    if typing.get_origin(annotation) is not list:
        return False
    (item,) = typing.get_args(annotation)
    return isinstance(item, type) and issubclass(item, BaseModel)


@functools.cache
def inline_data_fields(method: str) -> frozenset[str]:
    """The fields of ``method``'s config that carry a caller's data inline: lists of records
    (facts, examples, pairs, QA records) and of prompts (none for an unknown method)."""
    try:
        config = config_class(method)
    except KeyError:
        return frozenset()
    return frozenset(
        name
        for name, field in config.model_fields.items()
        if _is_record_list(field.annotation) or name.endswith(("prompts", "texts"))
    )


def without_inline_data(manifest: Manifest) -> Manifest:
    """``manifest`` with each operation's inline data (``inline_data_fields``, and any other
    list of records) replaced by its ``summary``: what callers other than its creators see."""

    def hidden(method: str, name: str, value: Any) -> bool:
        if not isinstance(value, list):
            return False
        records = bool(value) and all(isinstance(item, dict) for item in value)
        return name in inline_data_fields(method) or records

    operations = [
        {
            name: summary(value) if hidden(str(op.get("method", "")), name, value) else value
            for name, value in op.items()
        }
        for op in manifest.operations
    ]
    return manifest.model_copy(update={"operations": operations})


def carries_inline_data(manifest: Manifest) -> bool:
    """Whether ``without_inline_data`` hides anything of ``manifest``."""
    return without_inline_data(manifest).operations != manifest.operations


def version_to_proto(manifest: Manifest, *, with_data: bool = True) -> checkpoints_pb2.Version:
    """A version as the API shows it; ``with_data=False``: its manifest without the data its
    operations carried inline (``without_inline_data``)."""
    shown = manifest if with_data else without_inline_data(manifest)
    message = checkpoints_pb2.Version(
        id=manifest.id,
        parent_id=manifest.parent or "",
        root_reference=manifest.root.reference,
        root_digest=manifest.root.digest,
        methods=[str(op.get("method", "")) for op in manifest.operations],
        metrics={k: float(v) for k, v in manifest.metrics.items()},
        manifest_json=shown.model_dump_json(),
        changed_tensors=len(manifest.tensors) if manifest.parent else 0,
    )
    created = datetime.fromisoformat(manifest.created)
    message.created.CopyFrom(timestamp(created.timestamp()))
    return message
