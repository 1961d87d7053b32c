"""Bounds on every input and resource (issue 17): oversized specs, too many operations or gates,
method sizes past their limits and a job deadline past the server's are refused with the field
named, before anything is stored; ListJobs pages stay under the message limit whatever the rows
hold; the export cache stays under its byte bound and cleans up after a kill. The servers here
are the real servicers on loopback ports, over a real job table and store."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import build_tiny_tokenizer, tiny_model
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from pydantic import ValidationError

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.editing.registry import config_class
from modelsurgery.proto import limits
from modelsurgery.proto.spec import (
    JobSpec,
    SpecError,
    SpecTooLarge,
    parse_spec,
    spec_from_proto,
    spec_json_schema,
)
from modelsurgery.server import job_table as jt
from modelsurgery.server.engine import EngineSettings, JobEngine
from modelsurgery.server.executor import WorkerSettings
from modelsurgery.server.exports import LISTING_SUFFIX, ExportCache
from modelsurgery.server.job_service import JobService
from modelsurgery.server.metrics import ServerMetrics
from modelsurgery.v1 import jobs_pb2, jobs_pb2_grpc

MASK = {"method": "mask_heads", "heads": ["0.1"]}


def fact(i: int, prompt: str = "{} is in") -> dict[str, Any]:
    return {"prompt": prompt, "subject": f"Tower {i}", "target_new": "Rome"}


def spec(**fields: Any) -> dict[str, Any]:
    return {"base": "tiny", "operations": [MASK], **fields}


# --- specs ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "field"),
    [
        (spec(operations=[MASK] * (limits.MAX_OPERATIONS + 1)), "operations"),
        (spec(gates={f"op0.m{i}": "<= 1" for i in range(limits.MAX_GATES + 1)}), "gates"),
        (spec(gates={"x" * (limits.MAX_GATE_NAME_CHARS + 1): "<= 1"}), "gates"),
        (spec(gates={"op0.heads_masked": "<= " + "1" * 64}), "gates.op0.heads_masked"),
        (spec(base="b" * (limits.MAX_REFERENCE_CHARS + 1)), "base"),
        (spec(timeout_s=-1), "timeout_s"),
        (spec(timeout_s=math.inf), "timeout_s"),
    ],
)
def test_spec_counts_and_lengths_are_bounded(data: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(data)
    assert caught.value.field == field
    assert not isinstance(caught.value, SpecTooLarge)


def test_a_spec_over_the_byte_bound_is_too_large() -> None:
    prompt = "{} " + "is " * (limits.MAX_SPEC_BYTES // 3)
    data = spec(operations=[{"method": "memit", "facts": [fact(0, prompt)]}])
    with pytest.raises(SpecTooLarge) as caught:
        parse_spec(data)
    assert caught.value.field == "spec" and str(limits.MAX_SPEC_BYTES) in str(caught.value)


def test_twenty_thousand_operations_are_refused_before_any_is_parsed() -> None:
    message = jobs_pb2.JobSpec(base="tiny", operations=[jobs_pb2.Operation(method="x")] * 20_000)
    started = time.perf_counter()
    with pytest.raises(SpecError) as caught:
        spec_from_proto(message)
    assert caught.value.field == "operations"
    assert time.perf_counter() - started < 1.0


def test_timeout_s_travels_and_leaves_older_specs_unchanged() -> None:
    plain = parse_spec(spec())
    assert "timeout_s" not in plain.to_dict()  # same fingerprint as before the field existed
    timed = parse_spec(spec(timeout_s=90))
    assert timed.to_dict()["timeout_s"] == 90
    assert spec_from_proto(timed.to_proto()) == timed
    assert timed.fingerprint() != plain.fingerprint()
    assert "timeout_s" in spec_json_schema()["properties"]
    assert JobSpec.model_fields["timeout_s"].default == 0


# --- method configs ------------------------------------------------------------------------
def test_memit_takes_ten_thousand_facts_and_refuses_more() -> None:
    memit = config_class("memit")
    facts = [fact(i) for i in range(limits.MAX_MEMIT_FACTS)]
    assert len(memit.model_validate({"method": "memit", "facts": facts}).facts) == len(facts)
    with pytest.raises(ValidationError) as caught:
        memit.model_validate({"method": "memit", "facts": [*facts, fact(-1)]})
    assert caught.value.errors()[0]["loc"] == ("facts",)


@pytest.mark.parametrize(
    ("operation", "field"),
    [
        ({"method": "rome", "facts": [fact(i) for i in range(limits.MAX_ROME_FACTS + 1)]}, "facts"),
        ({"method": "rome", "facts": [fact(0)], "stats_samples": 10**6}, "stats_samples"),
        ({"method": "memit", "facts": [fact(0)], "stats_window": 10**5}, "stats_window"),
        (
            {"method": "reft", "layers": [0], "examples_file": "x", "epochs": 10**6},
            "epochs",
        ),
        (
            {"method": "reft", "layers": [0], "examples_file": "x", "max_length": 10**6},
            "max_length",
        ),
        ({"method": "lora", "text": "t", "epochs": limits.MAX_EPOCHS + 1}, "epochs"),
        ({"method": "lora", "text": "t", "text_samples": 10**7}, "text_samples"),
        ({"method": "lora", "text": "t", "text_window": 10**5}, "text_window"),
        ({"method": "prune", "calibration_samples": 10**6}, "calibration_samples"),
        ({"method": "prune", "calibration_seqlen": 10**6}, "calibration_seqlen"),
        (
            {"method": "ablate_direction", "dataset": "winogender", "calibration_windows": 10**6},
            "calibration_windows",
        ),
        (
            {
                "method": "steer",
                "pairs": [{"positive": "a", "negative": "b"}] * (limits.MAX_PAIRS + 1),
            },
            "pairs",
        ),
        ({"method": "mask_biased_heads", "max_pairs": 10**6}, "max_pairs"),
        ({"method": "iti", "pairs_file": "p", "top_k": 10**6}, "top_k"),
    ],
)
def test_method_sizes_are_bounded(operation: dict[str, Any], field: str) -> None:
    """The configs refuse it themselves, so the thin client does before sending."""
    with pytest.raises(ValidationError) as caught:
        config_class(operation["method"]).model_validate(operation)
    assert caught.value.errors()[0]["loc"][0] == field


def test_a_bound_names_the_operation_field_in_a_spec() -> None:
    data = spec(operations=[MASK, {"method": "lora", "text": "t", "epochs": 10**6}])
    with pytest.raises(SpecError) as caught:
        parse_spec(data)
    assert caught.value.field == "operations[1].epochs"


# --- the job service -----------------------------------------------------------------------
def violation(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """The status code and the google.rpc BadRequest field of a refused call."""
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        request = error_details_pb2.BadRequest()
        if detail.Unpack(request):
            return error.code(), request.field_violations[0].field
    return error.code(), ""


@asynccontextmanager
async def job_service(tmp_path: Path, **options: Any) -> AsyncIterator[Any]:
    """A JobService on a loopback port over a real job table (the engine is not started:
    nothing here reaches a worker), yielding (stub, table)."""
    table = jt.JobTable(tmp_path / "jobs.sqlite3")
    metrics = ServerMetrics(table)
    store = CheckpointStore(tmp_path / "store")
    worker = WorkerSettings(store_root=store.root, cache_dir=tmp_path / "cache")
    engine = JobEngine(table, EngineSettings(worker=worker), metrics)
    server = grpc.aio.server()
    service = JobService(
        table, engine, store, model_roots=None, max_queued_per_caller=100, **options
    )
    jobs_pb2_grpc.add_JobServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield jobs_pb2_grpc.JobServiceStub(channel), table
    finally:
        await server.stop(None)
        metrics.close()
        table.close()


def test_submit_refuses_oversized_specs_and_keeps_serving(tmp_path: Path) -> None:
    big = "{} " + "is " * (limits.MAX_SPEC_BYTES // 3)
    refused = [
        (
            jobs_pb2.JobSpec(base="tiny", operations=[jobs_pb2.Operation(method="x")] * 20_000),
            (grpc.StatusCode.INVALID_ARGUMENT, "spec.operations"),
        ),
        (
            parse_spec(spec()).to_proto(),
            None,  # gates added below: 25,000 of them, as measured
        ),
        (
            jobs_pb2.JobSpec(base="tiny"),
            None,  # one memit fact of 2 MiB, below
        ),
        (
            parse_spec(spec(timeout_s=3601)).to_proto(),
            (grpc.StatusCode.INVALID_ARGUMENT, "spec.timeout_s"),
        ),
    ]
    refused[1][0].gates.update({f"op0.m{i}": "<= 1" for i in range(25_000)})
    refused[1] = (refused[1][0], (grpc.StatusCode.INVALID_ARGUMENT, "spec.gates"))
    refused[2][0].operations.add(method="memit").params.update({"facts": [fact(0, big)]})
    refused[2] = (refused[2][0], (grpc.StatusCode.RESOURCE_EXHAUSTED, "spec"))

    async def scenario() -> None:
        async with job_service(tmp_path, max_job_seconds=3600) as (stub, table):
            for message, expected in refused:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec=message))
                assert violation(caught.value) == expected
            assert table.list(states=(), limit=10, offset=0) == []
            assert (await stub.ListJobs(jobs_pb2.ListJobsRequest())).jobs == []

    asyncio.run(scenario())


def test_list_jobs_pages_large_jobs_under_the_message_limit(tmp_path: Path) -> None:
    """Rows as large as a spec may be (and one stored before the bounds, with 25,000 gates)
    are listed page by page, every page under 4 MiB, none lost."""
    big = "{} " + "is " * (limits.MAX_SPEC_BYTES // 4)
    large = parse_spec(spec(operations=[{"method": "memit", "facts": [fact(0, big)]}]))

    async def scenario() -> None:
        async with job_service(tmp_path) as (stub, table):
            ids = set()
            for i in range(5):
                job, _ = table.submit(
                    request_id=f"r{i}", caller="anonymous", spec=large.to_dict(), fingerprint=f"{i}"
                )
                ids.add(job.id)
            legacy = {**spec(), "gates": {f"op0.m{i}": "<= 1" for i in range(25_000)}}
            job, _ = table.submit(
                request_id="old", caller="anonymous", spec=legacy, fingerprint="old"
            )
            ids.add(job.id)
            seen, token, pages = set(), "", 0
            while True:
                page = await stub.ListJobs(jobs_pb2.ListJobsRequest(page_token=token))
                assert page.ByteSize() < 4 << 20
                seen |= {j.id for j in page.jobs}
                pages += 1
                if not (token := page.next_page_token):
                    break
            assert seen == ids and pages > 1
            old = await stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.id))
            assert len(old.job.spec.gates) == 25_000

    asyncio.run(scenario())


# --- the export cache ----------------------------------------------------------------------
@pytest.fixture
def versions(store: CheckpointStore) -> list[str]:
    tokenizer = build_tiny_tokenizer()
    return [
        store.import_model(tiny_model("llama", seed=s), tokenizer, reference=f"tiny-{s}").id
        for s in range(3)
    ]


def exported(exports: ExportCache) -> set[str]:
    return {p.name for p in exports.root.iterdir() if p.is_dir()}


def test_export_cache_evicts_least_recently_used_and_rebuilds(
    store: CheckpointStore, versions: list[str], tmp_path: Path
) -> None:
    first, second, third = versions
    probe = ExportCache(tmp_path / "probe", store)
    size = sum(f.size for f in probe.listing(first))
    exports = ExportCache(tmp_path / "exports", store, max_bytes=int(2.5 * size))
    listing = exports.listing(first)
    exports.listing(second)
    assert exports.cached(first) is not None  # first is now the more recent of the two
    exports.listing(third)
    assert exported(exports) == {first, third}
    assert not (exports.root / f"{second}{LISTING_SUFFIX}").exists()
    assert exports.total_bytes() <= exports.max_bytes
    assert exports.cached(second) is None
    exports.listing(second)  # built again when asked for; first is the least recent now
    assert exported(exports) == {third, second}
    assert exports.listing(first) == listing


def test_a_pinned_export_is_never_evicted(
    store: CheckpointStore, versions: list[str], tmp_path: Path
) -> None:
    first, second, third = versions
    exports = ExportCache(tmp_path / "exports", store, max_bytes=1)
    exports.listing(first)
    with exports.pinned(first):
        exports.listing(second)
        exports.listing(third)
        assert exported(exports) == {first, third}  # over the bound while first streams
    exports.listing(second)
    assert exported(exports) == {second}


def test_leftovers_of_a_killed_export_are_removed_at_start(
    store: CheckpointStore, versions: list[str], tmp_path: Path
) -> None:
    """Left by a dead process (or in the older naming): removed. Of a live one (another server
    sharing the home, mid-export): kept."""
    root = tmp_path / "exports"
    kept = ExportCache(root, store).listing(versions[0])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    partial = root / f".partial-{versions[1]}-{dead.pid}-0123abcd"
    (partial / "sub").mkdir(parents=True)
    (partial / "sub" / "model.safetensors").write_bytes(b"\0" * 4096)
    older = root / f".partial-{versions[1]}-0123abcd"
    older.mkdir()
    temp_listing = root / f".{versions[1]}{LISTING_SUFFIX}-{dead.pid}-89abcdef"
    temp_listing.write_text("[")
    live = root / f".partial-{versions[1]}-{os.getpid()}-4567cdef"
    live.mkdir()
    reopened = ExportCache(root, store)
    assert not partial.exists() and not older.exists() and not temp_listing.exists()
    assert live.exists()
    assert reopened.listing(versions[0]) == kept
