"""A spec within the bounds is stored within them (issue 29): four MEMIT operations of 10,000
facts are accepted, stored compact, and shown by SubmitJob, GetJob and ListJobs under the
message limit; a spec whose stored form would be past the bounds is refused with nothing
stored; a row stored larger by an earlier release is shown summarised instead of failing the
RPC. The JobService runs on a loopback port with the real server's message limits."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import build_tiny_tokenizer, tiny_model

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.proto import limits
from modelsurgery.proto.spec import stored_spec_to_proto
from modelsurgery.server import job_table as jt
from modelsurgery.server.app import MAX_MESSAGE_BYTES
from modelsurgery.server.engine import EngineSettings, JobEngine
from modelsurgery.server.executor import WorkerSettings
from modelsurgery.server.job_service import JobService
from modelsurgery.server.metrics import ServerMetrics
from modelsurgery.v1 import jobs_pb2, jobs_pb2_grpc

LIMITS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


@asynccontextmanager
async def job_service(tmp_path: Path) -> AsyncIterator[Any]:
    """(stub, table): a JobService over a real job table (the engine is never started) and a
    store holding the tiny model as the version ``tiny``, with the server's and the client's
    message limits."""
    table = jt.JobTable(tmp_path / "jobs.sqlite3")
    metrics = ServerMetrics(table)
    store = CheckpointStore(tmp_path / "store")
    root = store.import_model(tiny_model("llama"), build_tiny_tokenizer(), reference="tiny")
    store.set_alias("tiny", root.id)
    worker = WorkerSettings(store_root=store.root, cache_dir=tmp_path / "cache")
    engine = JobEngine(table, EngineSettings(worker=worker), metrics)
    server = grpc.aio.server(options=LIMITS)
    service = JobService(table, engine, store, model_roots=None, max_queued_per_caller=100)
    jobs_pb2_grpc.add_JobServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=LIMITS) as channel:
            yield jobs_pb2_grpc.JobServiceStub(channel), table
    finally:
        await server.stop(None)
        metrics.close()
        table.close()


def memit_spec(operations: int = 4) -> dict[str, Any]:
    """MEMIT operations of 10,000 short facts each: four are just under the request bound
    (sent as given, ``stored_spec_to_proto``, as any client may send them)."""
    facts = [{"prompt": "{}", "subject": str(i), "target_new": "X"} for i in range(10_000)]
    return {"base": "tiny", "operations": [{"method": "memit", "facts": facts}] * operations}


def rows(table_path: Path) -> int:
    with sqlite3.connect(table_path) as db:
        return db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]


def test_a_large_spec_within_the_bounds_is_stored_and_shown(tmp_path: Path) -> None:
    request = jobs_pb2.SubmitJobRequest(spec=stored_spec_to_proto(memit_spec()), request_id="r")

    async def scenario() -> None:
        async with job_service(tmp_path) as (stub, _):
            submitted = (await stub.SubmitJob(request)).job
            again = await stub.SubmitJob(request)  # a retry returns the same job
            assert (again.job.id, again.created) == (submitted.id, False)
            shown = (await stub.GetJob(jobs_pb2.GetJobRequest(job_id=submitted.id))).job
            assert len(shown.spec.operations) == 4
            listed = (await stub.ListJobs(jobs_pb2.ListJobsRequest())).jobs
            assert [j.id for j in listed] == [submitted.id]
        with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
            (stored,) = db.execute("SELECT spec_json FROM jobs").fetchone()
        assert len(stored.encode()) <= limits.MAX_SPEC_BYTES
        assert rows(tmp_path / "jobs.sqlite3") == 1

    asyncio.run(scenario())


def test_a_spec_stored_past_the_bounds_is_refused_before_it_is_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stored form is bounded as a Job message too (here with a smaller bound, as no
    spec within the request bounds reaches the real one)."""
    monkeypatch.setattr(limits, "LIST_RESPONSE_BYTES", 1 << 20)
    request = jobs_pb2.SubmitJobRequest(spec=stored_spec_to_proto(memit_spec()))

    async def scenario() -> None:
        async with job_service(tmp_path) as (stub, _):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.SubmitJob(request)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "as stored" in (caught.value.details() or "")
            assert (await stub.ListJobs(jobs_pb2.ListJobsRequest())).jobs == []
        assert rows(tmp_path / "jobs.sqlite3") == 0

    asyncio.run(scenario())


def test_a_row_too_large_to_send_is_shown_summarised(tmp_path: Path) -> None:
    """As an earlier release stored four 10,000-fact MEMIT operations: every default filled
    in, 7 MB, past the 4 MiB message limit."""
    unset = ("ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth")
    legacy = memit_spec()
    for operation in legacy["operations"]:
        operation["facts"] = [{**f, **dict.fromkeys(unset)} for f in operation["facts"]]
    assert len(json.dumps(legacy)) > MAX_MESSAGE_BYTES

    async def scenario() -> None:
        async with job_service(tmp_path) as (stub, table):
            small, _ = table.submit(
                request_id="", caller="anonymous", spec=memit_spec(1), fingerprint="a"
            )
            big, _ = table.submit(request_id="", caller="anonymous", spec=legacy, fingerprint="b")
            listed = await stub.ListJobs(jobs_pb2.ListJobsRequest())
            assert [j.id for j in listed.jobs] == [small.id, big.id]
            shown = (await stub.GetJob(jobs_pb2.GetJobRequest(job_id=big.id))).job
            facts = shown.spec.operations[0].params["facts"]
            assert facts["count"] == 10_000 and len(facts["sha256"]) == 64
            whole = listed.jobs[0].spec.operations[0].params["facts"]
            assert len(whole) == 10_000  # a row that fits is shown whole

    asyncio.run(scenario())
