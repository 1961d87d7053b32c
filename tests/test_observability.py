"""Observability: job metrics read at scrape time, gRPC call metrics, JSON logs from every
source (Python libraries and native code), reflection v1 beside v1alpha, and health turning
NOT_SERVING when the server drains on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_grpc
from grpclib.client import Channel
from grpclib.reflection.v1 import reflection_pb2 as v1_pb2
from grpclib.reflection.v1.reflection_grpc import ServerReflectionStub
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.parser import text_string_to_metric_families as parse_text

from modelsurgery.client import Client
from modelsurgery.proto.job_state import JobState
from modelsurgery.server import job_table as jt
from modelsurgery.server.auth import BearerTokenInterceptor, Caller, Role
from modelsurgery.server.logs import JsonFormatter, native_record, native_threshold
from modelsurgery.server.metrics import ServerMetrics
from modelsurgery.server.process import ServerProcess, start_server
from modelsurgery.server.reflection import (
    V1_SERVICE_NAME,
    enable_server_reflection,
    v1_file_descriptor,
)
from modelsurgery.v1 import jobs_pb2

V1ALPHA_SERVICE_NAME = "grpc.reflection.v1alpha.ServerReflection"
TOKEN = "observability-token"


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def submit(table: jt.JobTable, name: str) -> jt.JobRecord:
    job, _ = table.submit(request_id=name, caller="ci", spec={}, fingerprint=name)
    return job


# --- job metrics ---------------------------------------------------------------------------
@pytest.fixture
def table(tmp_path: Path) -> Iterator[jt.JobTable]:
    table = jt.JobTable(tmp_path / "jobs.sqlite3")
    yield table
    table.close()


@pytest.fixture
def metrics(table: jt.JobTable) -> Iterator[ServerMetrics]:
    metrics = ServerMetrics(table)
    yield metrics
    metrics.close()


def test_job_gauges_are_read_from_the_table_at_scrape(
    table: jt.JobTable, metrics: ServerMetrics
) -> None:
    first, second = submit(table, "a"), submit(table, "b")
    table.mark_running(first.id)
    registry = metrics.registry
    assert sample(registry, "modelsurgery_jobs", state="RUNNING") == 1
    assert sample(registry, "modelsurgery_jobs", state="QUEUED") == 1
    assert sample(registry, "modelsurgery_queue_depth") == 1

    table.finish(first.id, JobState.SUCCEEDED, message="done")
    table.mark_running(second.id)
    table.add_event(second.id, "progress", "step 1")
    assert sample(registry, "modelsurgery_jobs", state="RUNNING") == 1
    assert sample(registry, "modelsurgery_jobs", state="SUCCEEDED") == 1
    assert sample(registry, "modelsurgery_queue_depth") == 0
    assert sample(registry, "modelsurgery_job_transitions_total", state="QUEUED") == 2
    assert sample(registry, "modelsurgery_job_transitions_total", state="RUNNING") == 2
    assert sample(registry, "modelsurgery_job_transitions_total", state="SUCCEEDED") == 1
    assert sample(registry, "modelsurgery_job_transitions_total", state="FAILED") == 0
    assert sample(registry, "modelsurgery_events_total", kind="state") == 5
    assert sample(registry, "modelsurgery_events_total", kind="progress") == 1


def test_event_counters_cover_the_table_history(table: jt.JobTable) -> None:
    """A server started on an existing table counts the events already stored."""
    job = submit(table, "a")
    table.request_cancel(job.id)
    fresh = ServerMetrics(table)
    try:
        assert sample(fresh.registry, "modelsurgery_job_transitions_total", state="CANCELLED") == 1
        assert sample(fresh.registry, "modelsurgery_events_total", kind="state") == 2
    finally:
        fresh.close()


def test_exposition_is_valid_openmetrics_with_process_metrics(metrics: ServerMetrics) -> None:
    """Prometheus asks for OpenMetrics first; a gauge and a counter sharing a family name (as
    modelsurgery_jobs and modelsurgery_jobs_total would) make that exposition invalid."""
    metrics.job_finished(2.0)
    families = {
        f.name: f for f in text_string_to_metric_families(openmetrics(metrics.registry).decode())
    }
    assert families["modelsurgery_jobs"].type == "gauge"
    assert families["modelsurgery_job_transitions"].type == "counter"
    assert families["modelsurgery_events"].type == "counter"
    assert families["modelsurgery_job_duration_seconds"].type == "histogram"
    assert "process_resident_memory_bytes" in families
    assert "python_info" in families
    assert "python_gc_collections" in families


# --- gRPC call metrics ---------------------------------------------------------------------
async def ping(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


@asynccontextmanager
async def echo_server(metrics: ServerMetrics) -> AsyncIterator[int]:
    """An aio server assembled as app.py does (metrics interceptor first, then auth), with
    health, reflection and one authenticated method."""
    server = grpc.aio.server(
        interceptors=[
            metrics.grpc_interceptor(),
            BearerTokenInterceptor({TOKEN: Caller("ci", Role.WRITER)}),
        ]
    )
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    ping_handler = grpc.unary_unary_rpc_method_handler(ping)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Echo", {"Ping": ping_handler}),)
    )
    enable_server_reflection([health.SERVICE_NAME, "test.Echo"], server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        yield port
    finally:
        await server.stop(None)


def test_grpc_calls_are_measured_by_method_and_status(metrics: ServerMetrics) -> None:
    """Health is left out: its Watch streams with context.write, which the interceptor breaks."""

    async def calls() -> None:
        async with (
            echo_server(metrics) as port,
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            stub = health_pb2_grpc.HealthStub(channel)
            await stub.Check(health_pb2.HealthCheckRequest())
            watch = stub.Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
            reflection = v1alpha_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([v1alpha_pb2.ServerReflectionRequest(file_containing_symbol="no.Such")])
            )
            assert [r.error_response.error_code async for r in reflection] == [
                grpc.StatusCode.NOT_FOUND.value[0]
            ]
            echo = channel.unary_unary("/test.Echo/Ping")
            assert await echo(b"x", metadata=(("authorization", f"Bearer {TOKEN}"),)) == b"x"
            with pytest.raises(grpc.aio.AioRpcError) as rejected:
                await echo(b"x")
            assert rejected.value.code() == grpc.StatusCode.UNAUTHENTICATED

    asyncio.run(calls())

    def count(method: str, status: str) -> float | None:
        return sample(
            metrics.registry,
            "rpc_server_call_duration_seconds_count",
            rpc_method=method,
            rpc_response_status_code=status,
            rpc_system_name="grpc",
        )

    assert count("test.Echo/Ping", "OK") == 1
    assert count("test.Echo/Ping", "UNAUTHENTICATED") == 1
    assert count(f"{V1ALPHA_SERVICE_NAME}/ServerReflectionInfo", "OK") == 1
    assert not any(
        s.labels.get("rpc_method", "").startswith(health.SERVICE_NAME)
        for family in metrics.registry.collect()
        for s in family.samples
    )


def test_call_duration_buckets_are_seconds(metrics: ServerMetrics) -> None:
    """A call of a few milliseconds lands below 1 s, not in the first of millisecond buckets
    (0, 5, 10 ... read as seconds, every call fell in ``le="5"``)."""

    async def one_call() -> None:
        async with (
            echo_server(metrics) as port,
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            echo = channel.unary_unary("/test.Echo/Ping")
            await echo(b"x", metadata=(("authorization", f"Bearer {TOKEN}"),))

    asyncio.run(one_call())
    labels = {
        "rpc_method": "test.Echo/Ping",
        "rpc_response_status_code": "OK",
        "rpc_system_name": "grpc",
    }
    buckets = {
        float(s.labels["le"]): s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == "rpc_server_call_duration_seconds_bucket"
        and all(s.labels.get(k) == v for k, v in labels.items())
    }
    assert 0.005 in buckets and 1.0 in buckets and 5.0 in buckets
    assert buckets[1.0] == 1
    assert 10000.0 not in buckets


# --- reflection ----------------------------------------------------------------------------
def canonical(message: descriptor_pb2.DescriptorProto) -> list[tuple[object, ...]]:
    fields = [
        (f.name, f.number, f.type, f.label, f.type_name, f.oneof_index) for f in message.field
    ]
    return [message.name, *fields, *(o.name for o in message.oneof_decl)]


def test_v1_descriptor_matches_the_published_v1_proto() -> None:
    """The premise of serving v1 with v1alpha's servicer: the same messages, field for field
    (compared with grpclib's copy of grpc/reflection/v1/reflection.proto)."""
    ours = v1_file_descriptor()
    published = descriptor_pb2.FileDescriptorProto()
    v1_pb2.DESCRIPTOR.CopyToProto(published)
    assert ours.package == published.package == "grpc.reflection.v1"
    assert [canonical(m) for m in ours.message_type] == [
        canonical(m) for m in published.message_type
    ]
    assert [str(s) for s in ours.service] == [str(s) for s in published.service]


async def reflect_v1(port: int, *requests: v1_pb2.ServerReflectionRequest) -> list:
    """A v1-only client: grpclib (its own HTTP/2 stack) with the published v1 messages."""
    async with (
        Channel("127.0.0.1", port) as channel,
        ServerReflectionStub(channel).ServerReflectionInfo.open() as stream,
    ):
        replies = []
        for request in requests:
            await stream.send_message(request)
            replies.append(await stream.recv_message())
        await stream.end()
        return replies


async def check_reflection_v1(port: int, expected: set[str]) -> None:
    listed, described = await reflect_v1(
        port,
        v1_pb2.ServerReflectionRequest(list_services=""),
        v1_pb2.ServerReflectionRequest(file_containing_symbol=V1_SERVICE_NAME),
    )
    names = {s.name for s in listed.list_services_response.service}
    assert expected | {V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME} <= names
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(blob)
        for blob in described.file_descriptor_response.file_descriptor_proto
    ]
    assert [f.package for f in files] == ["grpc.reflection.v1"]
    assert [s.name for s in files[0].service] == ["ServerReflection"]


def test_reflection_v1_and_v1alpha(metrics: ServerMetrics) -> None:
    async def scenario() -> v1alpha_pb2.ServerReflectionResponse:
        async with echo_server(metrics) as port:
            await check_reflection_v1(port, {health.SERVICE_NAME, "test.Echo"})
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stream = v1alpha_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                    iter([v1alpha_pb2.ServerReflectionRequest(list_services="")]), timeout=30
                )
                (reply,) = [reply async for reply in stream]
                return reply

    reply = asyncio.run(scenario())
    assert V1ALPHA_SERVICE_NAME in {s.name for s in reply.list_services_response.service}


# --- logs ----------------------------------------------------------------------------------
def test_native_lines_become_records() -> None:
    absl = "E1202 07:42:42.442571   10421 chttp2_server.cc:1021] bind failed: address in use"
    assert native_record(absl) == (
        "grpc.core",
        logging.ERROR,
        "bind failed: address in use",
        {"source": "chttp2_server.cc:1021"},
    )
    spdlog = "[2026-12-02 07:44:24,002 W 11741 11760] core_worker.cc:512: slow object store"
    assert native_record(spdlog) == (
        "ray.core",
        logging.WARNING,
        "slow object store",
        {"source": "core_worker.cc:512"},
    )
    assert native_record("Segmentation fault") == (
        "stdio",
        logging.WARNING,
        "Segmentation fault",
        {},
    )
    assert native_threshold({}) == logging.WARNING
    assert native_threshold({"GRPC_VERBOSITY": "INFO"}) == logging.DEBUG


def test_json_formatter_fields() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "modelsurgery.x", logging.ERROR, __file__, 1, "failed %s", ("j",), sys.exc_info()
        )
    record.job_id = "job-1"
    record._ray_timestamp_ns = 1
    line = json.loads(JsonFormatter().format(record))
    assert list(line)[:4] == ["time", "level", "logger", "message"]
    assert line["time"].endswith("Z") and line["level"] == "error"
    assert line["message"] == "failed j" and line["job_id"] == "job-1"
    assert "ValueError: boom" in line["exception"]
    assert "_ray_timestamp_ns" not in line


RELAY_SCRIPT = textwrap.dedent(
    """
    import logging, os, warnings
    import ray  # configures its own "ray" logger on import, as in the server
    from modelsurgery.server.logs import configure_logging, relay_output

    with relay_output():
        configure_logging()
        logging.getLogger("modelsurgery.test").info("hello", extra={"job_id": "job-1"})
        logging.getLogger("ray._private.worker").warning("from ray")
        os.write(2, b"I0101 00:00:00.000000   1 fork_posix.cc:71] skipping fork() handlers\\n")
        os.write(2, b"E0101 00:00:00.000000   1 chttp2_server.cc:10] bind failed\\n")
        os.write(1, b"[2026-01-01 00:00:00,000 W 1 1] core_worker.cc:5: slow\\n")
        print("a stray print", flush=True)
        os.write(2, b"Loading weights:  40%|####      | 2/5 [00:01<00:02,  1.5it/s]\\r")
        os.write(2, b"Loading weights: 100%|##########| 5/5 [00:02<00:00,  2.0it/s]\\n")
        from tqdm import tqdm
        for _ in tqdm(range(3), desc="a bar tqdm draws"):
            pass
        warnings.warn("an old API")
    """
)


def test_every_output_line_is_json() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    done = subprocess.run(
        [sys.executable, "-c", RELAY_SCRIPT], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    records = [json.loads(line) for line in done.stderr.splitlines()]
    by_message = {r["message"]: r for r in records}
    assert by_message["hello"]["job_id"] == "job-1"
    assert by_message["from ray"]["logger"] == "ray._private.worker"
    assert by_message["bind failed"]["logger"] == "grpc.core"
    assert by_message["bind failed"]["level"] == "error"
    assert by_message["slow"]["logger"] == "ray.core"
    assert by_message["a stray print"]["logger"] == "stdio"
    assert any(r["logger"] == "py.warnings" and "an old API" in r["message"] for r in records)
    assert not any("fork()" in r["message"] for r in records)
    assert not any("Loading weights" in r["message"] for r in records)
    assert not any("a bar tqdm draws" in r["message"] for r in records)


# --- the real server -----------------------------------------------------------------------
pytest_e2e = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[ServerProcess]:
    process = start_server(
        tmp_path_factory.mktemp("observability"),
        "--metrics-port",
        "0",
        model_roots=(tiny_model_dir,),
    )
    yield process
    process.stop()


def scrape(server: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=30).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in parse_text(body)
        for s in family.samples
    }


def slow_spec(model: Path) -> dict:
    operation = {"method": "mask_heads", "heads": ["0.1"], "evaluate_perplexity": True}
    return {"base": str(model), "operations": [operation]}


def running_then_queued(client: Client, first: str, second: str) -> bool:
    states = (client.get_job(first).state, client.get_job(second).state)
    return states == (jobs_pb2.JOB_STATE_RUNNING, jobs_pb2.JOB_STATE_QUEUED)


@pytest_e2e
def test_real_server_reports_running_and_queued_jobs(
    server: ServerProcess, tiny_model_dir: Path
) -> None:
    """The reported case: one job RUNNING and one QUEUED (one worker) read 1 and 1. A scrape
    counts only when both states held before and after it; jobs are retried a few times."""
    with Client(server.address, timeout=60) as client:
        for _ in range(5):
            first = client.submit(slow_spec(tiny_model_dir)).id
            second = client.submit(slow_spec(tiny_model_dir)).id
            deadline = time.monotonic() + 120
            while client.get_job(first).state == jobs_pb2.JOB_STATE_QUEUED:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            before = running_then_queued(client, first, second)
            values = scrape(server)
            held = before and running_then_queued(client, first, second)
            client.wait(second, timeout=300)
            if held:
                break
        else:
            pytest.fail("never saw one job running while the other was queued")
    assert values[("modelsurgery_jobs", (("state", "RUNNING"),))] == 1
    assert values[("modelsurgery_jobs", (("state", "QUEUED"),))] == 1
    assert values[("modelsurgery_queue_depth", ())] == 1

    values = scrape(server)
    assert values[("modelsurgery_jobs", (("state", "SUCCEEDED"),))] >= 2
    assert values[("modelsurgery_job_transitions_total", (("state", "SUCCEEDED"),))] >= 2
    assert values[("modelsurgery_events_total", (("kind", "progress"),))] > 0
    assert values[("modelsurgery_job_duration_seconds_count", ())] >= 2
    submitted = (
        "rpc_server_call_duration_seconds_count",
        (
            ("rpc_method", "modelsurgery.v1.JobService/SubmitJob"),
            ("rpc_response_status_code", "OK"),
            ("rpc_system_name", "grpc"),
        ),
    )
    assert values[submitted] >= 2
    assert values[("process_resident_memory_bytes", ())] > 0


@pytest_e2e
def test_real_server_serves_reflection_v1(server: ServerProcess) -> None:
    services = {"modelsurgery.v1.JobService", "modelsurgery.v1.CheckpointService"}
    asyncio.run(check_reflection_v1(server.port, {*services, health.SERVICE_NAME}))


@pytest_e2e
def test_sigterm_turns_health_not_serving_and_every_log_line_is_json(
    server: ServerProcess, tiny_model_dir: Path
) -> None:
    with Client(server.address, timeout=60) as client:
        client.wait(client.submit(slow_spec(tiny_model_dir)).id, timeout=300)
    with grpc.insecure_channel(server.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="modelsurgery.v1.JobService"), timeout=120
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        server.process.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
    assert server.process.wait(timeout=60) == 0
    lines = server.log.read_text().splitlines()
    assert lines
    for line in lines:
        assert isinstance(json.loads(line), dict), line
