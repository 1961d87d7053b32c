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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelsurgery.client.sdk import Client
from modelsurgery.proto.job_state import JobState
from modelsurgery.proto.spec import JobSpec, SpecError, parse_spec


@dataclass
class BatchItem:
    label: str
    spec: JobSpec


@dataclass
class BatchResult:
    label: str
    job_id: str
    state: JobState
    version_id: str | None
    metrics: dict[str, float]
    error: str


def over_bases(spec: JobSpec, bases: list[str]) -> list[BatchItem]:
    """The same operations on each base."""
    return [BatchItem(base, parse_spec({**spec.to_dict(), "base": base})) for base in bases]


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
        items.append(BatchItem(label, parse_spec({**data, "operations": operations})))
        chunk.clear()

    for fact in facts:
        chunk.append(fact)
        if len(chunk) == per_job:
            flush()
    if chunk:
        flush()
    return items


def request_id(batch_name: str, item: BatchItem) -> str:
    digest = hashlib.sha256(f"{batch_name}\0{item.spec.fingerprint()}".encode()).hexdigest()
    return f"batch-{digest[:32]}"


def run_batch(
    client: Client,
    items: list[BatchItem],
    *,
    concurrency: int = 4,
    batch_name: str = "batch",
    on_update: Callable[[BatchResult], None] | None = None,
) -> list[BatchResult]:
    """Submit every item (at most ``concurrency`` in flight), wait for all, in input order."""
    lock = threading.Lock()

    def one(item: BatchItem) -> BatchResult:
        job = client.submit(item.spec, request_id=request_id(batch_name, item))
        job = client.wait(job.id)
        result = BatchResult(
            label=item.label,
            job_id=job.id,
            state=JobState.from_proto(job.state),
            version_id=job.version_id or None,
            metrics=dict(job.metrics),
            error=job.error,
        )
        if on_update is not None:
            with lock:
                on_update(result)
        return result

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return list(pool.map(one, items))


def all_succeeded(results: list[BatchResult]) -> bool:
    return all(r.state is JobState.SUCCEEDED for r in results)
