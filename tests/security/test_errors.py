"""Errors that help and leak nothing (issue 17): an unexpected servicer error is INTERNAL with a
reference (its traceback in the server log only), a worker's error wrapped by Ray keeps its
status and own message (no PID, node IP, ANSI codes), a job failing on a user's data file does
not echo the file, and server paths in messages become placeholders."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from ray.exceptions import RayTaskError

from modelsurgery.checkpoints import VersionNotFoundError
from modelsurgery.client import Client
from modelsurgery.client.errors import InvalidArgument
from modelsurgery.editing.contrast.pairs import read_pairs_jsonl
from modelsurgery.editing.data import read_text
from modelsurgery.editing.examples import load_examples
from modelsurgery.editing.iti.records import read_records_jsonl
from modelsurgery.editing.stereotypes.pairs import load_pairs_jsonl
from modelsurgery.proto.job_state import JobState
from modelsurgery.server.app import ServerSettings
from modelsurgery.server.executor import WorkerSettings
from modelsurgery.server.failures import FailureInterceptor
from modelsurgery.server.outcome import JobOutcome
from modelsurgery.server.process import start_server
from modelsurgery.server.redact import MAX_MESSAGE_CHARS, scrub
from modelsurgery.server.reflection import enable_server_reflection
from modelsurgery.server.worker import SurgeryWorker
from modelsurgery.v1 import jobs_pb2

SECRET = "hunter2-SECRET-VALUE"
SERVICE = "modelsurgery.test.Failures"
RAY_TRACEBACK = (
    "\x1b[36mray::SurgeryWorker.generate()\x1b[39m (pid=4242, ip=10.1.2.3)\n"
    "Traceback (most recent call last):\n  File worker.py, line 9\nValueError: ..."
)


def _from_worker(cause: Exception) -> Exception:
    """The exception ``await actor.method.remote()`` raises for ``cause`` in the worker."""
    return RayTaskError(
        "SurgeryWorker.generate",
        RAY_TRACEBACK,
        cause,
        proctitle="ray::SurgeryWorker.generate",
        pid=4242,
        ip="10.1.2.3",
    ).as_instanceof_cause()


def _raising(exc: Exception) -> Callable[[bytes, grpc.aio.ServicerContext], Any]:
    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise exc

    return handler


async def _aborts(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, "job job-1 belongs to another caller")
    raise AssertionError("abort returned")


async def _streams_then_fails(request: bytes, context: grpc.aio.ServicerContext) -> Any:
    yield b"first event"
    raise KeyError("cursor")


def _settings(tmp_path: Path) -> ServerSettings:
    return ServerSettings(store_root=tmp_path / "home" / "store", data_roots=(tmp_path / "data",))


def _call(settings: ServerSettings, method: str) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """Call ``method`` of a real grpc.aio server guarded by the interceptor, on loopback."""
    handlers = {
        "Unexpected": grpc.unary_unary_rpc_method_handler(
            _raising(RuntimeError(f"blob {settings.store_root}/blobs/ab is corrupt"))
        ),
        "WorkerValueError": grpc.unary_unary_rpc_method_handler(
            _raising(_from_worker(ValueError("prompts[0]: 5000 tokens, the most is 2048")))
        ),
        "WorkerNotFound": grpc.unary_unary_rpc_method_handler(
            _raising(_from_worker(VersionNotFoundError("no version or alias 'v9'")))
        ),
        "WorkerUnexpected": grpc.unary_unary_rpc_method_handler(
            _raising(_from_worker(KeyError("model.layers.0.mlp")))
        ),
        "Aborts": grpc.unary_unary_rpc_method_handler(_aborts),
        "Stream": grpc.unary_stream_rpc_method_handler(_streams_then_fails),
    }

    async def scenario() -> tuple[grpc.StatusCode, str, list[bytes]]:
        server = grpc.aio.server(interceptors=[FailureInterceptor(settings)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        received: list[bytes] = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                path = f"/{SERVICE}/{method}"
                if method == "Stream":
                    async for item in channel.unary_stream(path)(b""):
                        received.append(item)
                else:
                    received.append(await channel.unary_unary(path)(b""))
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or "", received
        finally:
            await server.stop(None)
        raise AssertionError(f"{method} succeeded")

    return asyncio.run(scenario())


def test_unexpected_error_is_internal_with_a_reference_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path)
    with caplog.at_level(logging.ERROR, logger="modelsurgery.server"):
        code, message, _ = _call(settings, "Unexpected")
    assert code is grpc.StatusCode.INTERNAL
    match = re.fullmatch(r"internal error \(reference ([0-9a-f]{8})\)", message)
    assert match is not None, message
    logged = [r for r in caplog.records if match.group(1) in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].exc_info is not None and "corrupt" in str(logged[0].exc_info[1])


def test_worker_value_error_keeps_its_status_and_message_only(tmp_path: Path) -> None:
    code, message, _ = _call(_settings(tmp_path), "WorkerValueError")
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert message == "prompts[0]: 5000 tokens, the most is 2048"
    for leak in ("4242", "10.1.2.3", "\x1b", "Traceback", "ray::"):
        assert leak not in message


def test_worker_domain_error_maps_to_its_status(tmp_path: Path) -> None:
    assert _call(_settings(tmp_path), "WorkerNotFound")[:2] == (
        grpc.StatusCode.NOT_FOUND,
        "no version or alias 'v9'",
    )


def test_unknown_worker_error_is_internal_without_the_ray_traceback(tmp_path: Path) -> None:
    code, message, _ = _call(_settings(tmp_path), "WorkerUnexpected")
    assert code is grpc.StatusCode.INTERNAL
    assert message.startswith("internal error (reference ")
    assert "pid" not in message and "model.layers" not in message


def test_explicit_abort_passes_untouched(tmp_path: Path) -> None:
    assert _call(_settings(tmp_path), "Aborts")[:2] == (
        grpc.StatusCode.PERMISSION_DENIED,
        "job job-1 belongs to another caller",
    )


def test_streaming_error_after_a_message_is_internal(tmp_path: Path) -> None:
    code, message, received = _call(_settings(tmp_path), "Stream")
    assert received == [b"first event"]
    assert code is grpc.StatusCode.INTERNAL
    assert "cursor" not in message


def test_health_watch_and_reflection_stream_through_the_interceptor(tmp_path: Path) -> None:
    """Health's Watch streams with ``context.write`` and reflection is bidirectional: both
    still work behind the interceptor, as app.py installs it for every service."""

    async def scenario() -> tuple[int, int, list[int]]:
        server = grpc.aio.server(interceptors=[FailureInterceptor(_settings(tmp_path))])
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        enable_server_reflection([health.SERVICE_NAME], server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                checked = (await stub.Check(health_pb2.HealthCheckRequest())).status
                watch = stub.Watch(health_pb2.HealthCheckRequest())
                watched = (await watch.read()).status
                watch.cancel()
                request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.X")
                answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                    iter([request])
                )
                codes = [r.error_response.error_code async for r in answers]
                return checked, watched, codes
        finally:
            await server.stop(None)

    serving = health_pb2.HealthCheckResponse.SERVING
    assert asyncio.run(scenario()) == (serving, serving, [grpc.StatusCode.NOT_FOUND.value[0]])


def test_scrub_replaces_home_roots_and_cwd(tmp_path: Path) -> None:
    real = tmp_path / "real-models"
    real.mkdir()
    link = tmp_path / "models"
    link.symlink_to(real)
    settings = WorkerSettings(
        store_root=tmp_path / "home" / "store",
        cache_dir=tmp_path / "home" / "cache",
        data_roots=(tmp_path / "data",),
        model_roots=(link,),
    )
    message = (
        f"{tmp_path}/data/f.jsonl, {tmp_path}/database/x, {tmp_path}/home/jobs.sqlite3, "
        f"{tmp_path}/home/store/blobs/ab, {real}/llama/config.json, {os.getcwd()}/x.py, "
        "\x1b[31mred\x1b[0m"
    )
    assert scrub(message, settings) == (
        f"<data-root>/f.jsonl, {tmp_path}/database/x, <home>/jobs.sqlite3, <store>/blobs/ab, "
        "<model-root>/llama/config.json, <cwd>/x.py, red"
    )
    assert len(scrub("x" * 10 * MAX_MESSAGE_CHARS, settings)) == MAX_MESSAGE_CHARS


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


BAD_LINES = {
    "not json": ["{" + json.dumps("prompt") + ": " + json.dumps(SECRET)],
    "missing field": [json.dumps({"prompt": SECRET})],
    "wrong type": [json.dumps({"prompt": SECRET, "completion": 5})],
    "extra key": [json.dumps({"prompt": "a", "completion": "b", SECRET: 1})],
    "not an object": [json.dumps(SECRET)],
}
# reader -> (read a path, a valid first line)
READERS: dict[str, tuple[Callable[[Path], object], dict[str, Any]]] = {
    "examples": (
        lambda path: load_examples(None, path.name, [path.parent]),
        {"prompt": "p", "completion": "c"},
    ),
    "text": (lambda path: read_text(path, "text"), {"text": "t"}),
    "contrast pairs": (read_pairs_jsonl, {"positive": "a", "negative": "b"}),
    "bias pairs": (load_pairs_jsonl, {"stereo": "a", "anti": "b"}),
    "iti records": (read_records_jsonl, {"question": "q", "true": "t", "false": "f"}),
}


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_data_file_errors_name_the_line_not_its_content(
    tmp_path: Path, reader: str, case: str
) -> None:
    read, good = READERS[reader]
    path = _write(tmp_path / "data" / "bad.jsonl", [json.dumps(good), *BAD_LINES[case]])
    with pytest.raises(ValueError) as raised:
        read(path)
    message = str(raised.value)
    assert SECRET not in message
    assert str(tmp_path) not in message
    assert "line 2 of bad.jsonl" in message, message


def test_not_json_says_where_and_what(tmp_path: Path) -> None:
    _write(tmp_path / "bad.jsonl", ['{"prompt": "' + SECRET + '", '])
    with pytest.raises(ValueError) as raised:
        load_examples(None, "bad.jsonl", [tmp_path])
    assert str(raised.value) == (
        "examples_file: line 1 of bad.jsonl: not valid JSON "
        "(expecting property name enclosed in double quotes at column 36)"
    )


def test_job_failing_on_a_data_file_reports_no_secret_path_or_traceback(
    tmp_path: Path, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The real worker runs a LoRA job on a tiny model whose examples file has a bad line."""
    data = tmp_path / "data"
    _write(data / "train.jsonl", [json.dumps({"prompt": "a", "completion": "b"}), SECRET])
    settings = WorkerSettings(
        store_root=tmp_path / "home" / "store",
        cache_dir=tmp_path / "home" / "cache",
        data_roots=(data,),
    )
    spec = {
        "base": str(tiny_model_dir),
        "operations": [
            {"method": "lora", "examples_file": "train.jsonl", "evaluate_perplexity": False}
        ],
    }
    worker = SurgeryWorker(settings, num_threads=1)
    with caplog.at_level(logging.ERROR, logger="modelsurgery.worker"):
        outcome = list(worker.run_job("job-secret", spec))[-1]
    assert isinstance(outcome, JobOutcome) and outcome.state == JobState.FAILED
    error = outcome.error
    assert error.startswith("ValueError: examples_file: line 2 of train.jsonl: not valid JSON")
    assert SECRET not in error and str(tmp_path) not in error and "Traceback" not in error
    assert any(r.exc_info for r in caplog.records if "job-secret" in r.getMessage())


@pytest.mark.e2e
def test_real_server_reports_worker_failures_without_leaks(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Through Ray and the real server: a model folder whose config is not JSON, and a job
    whose examples file has a bad line; the server keeps serving."""
    home = tmp_path / "home"
    shutil.copytree(tiny_model_dir, home / "models" / "tiny")
    broken = home / "models" / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text("{" + SECRET, encoding="utf-8")
    _write(home / "data" / "train.jsonl", [json.dumps({"prompt": "a", "completion": "b"}), SECRET])
    server = start_server(home)
    try:
        with Client(server.address) as client:
            with pytest.raises(InvalidArgument) as raised:
                client.import_model(str(broken))
            message = raised.value.message
            assert "<model-root>/broken" in message, message
            for leak in (SECRET, str(tmp_path), "pid=", "ip=", "\x1b", "Traceback"):
                assert leak not in message, message
            spec = {
                "base": str(home / "models" / "tiny"),
                "operations": [
                    {"method": "lora", "examples_file": "train.jsonl", "evaluate_perplexity": False}
                ],
            }
            job = client.wait(client.submit(spec).id, timeout=120)
            assert job.state == jobs_pb2.JOB_STATE_FAILED
            assert "line 2 of train.jsonl: not valid JSON" in job.error, job.error
            assert SECRET not in job.error and str(tmp_path) not in job.error
            assert [j.id for j in client.list_jobs()] == [job.id]
    finally:
        server.stop()
