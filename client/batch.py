"""Batch surgery: fan one spec out over many bases or many fact sets as parallel jobs.

The server runs as many jobs at once as it has workers (``serve --workers N``, or the Ray
cluster it is attached to); ``concurrency`` bounds how many this batch keeps in flight.
Request ids derive from the batch name and the item, so re-running a batch reuses the jobs that
succeeded (or are still queued or running) and runs the failed or cancelled ones again.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelsurgery.client.connection import as_spec
from modelsurgery.client.errors import ModelSurgeryError, WaitTimeout
from modelsurgery.client.sdk import Client
from modelsurgery.proto.job_state import JobState
from modelsurgery.proto.spec import JobSpec, SpecError


@dataclass
class BatchItem:
    """One job of a batch; ``refused`` (and no spec) when its spec failed validation."""

    label: str
    spec: JobSpec | None
    refused: ModelSurgeryError | None = None


@dataclass
class BatchResult:
    """One item's outcome. ``state`` is the job's end state; None when the item has no
    verdict, and ``problem`` says why: refused (at validation or submit), its wait timed out,
    or the server could not be reached."""

    label: str
    job_id: str = ""
    state: JobState | None = None
    version_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    problem: ModelSurgeryError | None = None


def _item(label: str, data: dict[str, Any]) -> BatchItem:
    try:
        return BatchItem(label, as_spec(data))
    except ModelSurgeryError as exc:
        return BatchItem(label, None, exc)


def over_bases(spec: JobSpec, bases: list[str]) -> list[BatchItem]:
    """The same operations on each base, each validated on its own."""
    return [_item(base, {**spec.to_dict(), "base": base}) for base in bases]


def read_facts(path: Path) -> Iterator[dict[str, Any]]:
    """Facts from a JSONL file (one fact per line) or a JSON list, read lazily for JSONL."""
    with path.open(encoding="utf-8") as handle:
        first = handle.read(1)
        handle.seek(0)
        if first == "[":
            yield from json.load(handle)
            return
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SpecError("facts_file", f"line {number}: {exc.msg}") from None


def over_fact_sets(spec: JobSpec, facts: Iterator[dict[str, Any]], per_job: int) -> list[BatchItem]:
    """One job per ``per_job`` facts: the spec's first operation with a ``facts`` field gets
    each chunk in turn (e.g. thousands of MEMIT facts as several jobs of a few hundred)."""
    data = spec.to_dict()
    index = next((i for i, op in enumerate(data["operations"]) if "facts" in op), None)
    if index is None:
        raise SpecError("operations", "no operation takes facts (rome or memit)")
    items, chunk = [], []

    def flush() -> None:
        operations = [dict(op) for op in data["operations"]]
        operations[index]["facts"] = list(chunk)
        label = f"facts {len(items) * per_job}-{len(items) * per_job + len(chunk) - 1}"
        items.append(_item(label, {**data, "operations": operations}))
        chunk.clear()

    for fact in facts:
        chunk.append(fact)
        if len(chunk) == per_job:
            flush()
    if chunk:
        flush()
    return items


def request_id(batch_name: str, item: BatchItem) -> str:
    assert item.spec is not None, "a refused item has no request"
    digest = hashlib.sha256(f"{batch_name}\0{item.spec.fingerprint()}".encode()).hexdigest()
    return f"batch-{digest[:32]}"


def refused(item: BatchItem) -> BatchResult:
    """The outcome of an item whose spec failed validation: never submitted."""
    assert item.refused is not None
    return BatchResult(item.label, error=item.refused.message, problem=item.refused)


def run_batch(
    client: Client,
    items: list[BatchItem],
    *,
    concurrency: int = 4,
    batch_name: str = "batch",
    timeout: float | None = None,
    on_update: Callable[[BatchResult], None] | None = None,
) -> list[BatchResult]:
    """Submit every item (at most ``concurrency`` in flight) and wait for all, in input order.
    One item's refusal or broken wait is that item's outcome: the others still run.
    ``timeout`` bounds the whole batch: items still waiting then end with WaitTimeout (their
    jobs go on), and items not submitted by then are not submitted."""
    lock = threading.Lock()
    ends = None if timeout is None else time.monotonic() + timeout

    def one(item: BatchItem) -> BatchResult:
        result = BatchResult(item.label)
        try:
            left = None if ends is None else ends - time.monotonic()
            if left is not None and left <= 0:
                raise WaitTimeout("", timeout or 0.0, "not submitted: the batch's timeout ran out")
            job = client.submit(item.spec, request_id=request_id(batch_name, item))
            result.job_id = job.id
            job = client.wait(job.id, timeout=None if ends is None else ends - time.monotonic())
            result.state = JobState.from_proto(job.state)
            result.version_id = job.version_id or None
            result.metrics = dict(job.metrics)
            result.error = job.error
        except ModelSurgeryError as exc:
            result.error, result.problem = exc.message, exc
        if on_update is not None:
            with lock:
                on_update(result)
        return result

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return list(pool.map(one, items))
