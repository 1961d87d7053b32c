"""The CI contract of ``modelsurgery apply`` against the real server (own process, embedded Ray):
re-runs after a failure or a cancel do new work, every outcome has its exit code and leaves a
JUnit report, and a server that dies mid-wait ends apply with exit 4 within 30 s.

Servers started with ``--workers 0`` never start a job, so a job stays queued for as long as a
test needs it to (to cancel it, to time out on it, to kill the server under a waiting apply).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import read_junit
from junitparser import Error, Failure
from typer.testing import CliRunner

from modelsurgery.client import Client
from modelsurgery.client.cli import app
from modelsurgery.client.cli_common import (
    EXIT_FAILED,
    EXIT_INFRASTRUCTURE,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_TIMEOUT,
)
from modelsurgery.server.process import ServerProcess, start_server
from modelsurgery.v1 import jobs_pb2

pytestmark = pytest.mark.e2e
KILL_TO_EXIT_LIMIT_S = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Killed at the end, not stopped: its state is thrown away, and a graceful stop spends
    some 17 s shutting Ray down."""
    roots = (tmp_path_factory.getbasetemp(),)
    process = start_server(tmp_path_factory.mktemp("ci-home"), model_roots=roots)
    yield process
    process.kill()


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    roots = (tmp_path_factory.getbasetemp(),)
    home = tmp_path_factory.mktemp("ci-idle-home")
    process = start_server(home, "--workers", "0", model_roots=roots)
    yield process
    process.kill()


def patch_file(folder: Path, base: Path, heads: list[str], gates: str = "") -> Path:
    spec = folder / "patch.yaml"
    spec.write_text(
        f"base: {base}\noperations:\n  - method: mask_heads\n    heads: {heads}\n"
        + (f"gates:\n  {gates}\n" if gates else "")
    )
    return spec


def apply(server: ServerProcess, *args: str) -> tuple[int, dict]:
    """``apply ... --json --server`` in this process: exit code and the JSON it printed."""
    result = CliRunner().invoke(app, ["apply", *args, "--json", "--server", server.address])
    return result.exit_code, json.loads(result.stdout)


def apply_process(address: str, *args: str) -> subprocess.Popen[str]:
    """``apply`` as CI runs it: its own process, the server from MODELSURGERY_SERVER."""
    return subprocess.Popen(
        [sys.executable, "-m", "modelsurgery.client.cli", "apply", *args],
        env={**os.environ, "MODELSURGERY_SERVER": address, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_rerun_after_failed_gate_runs_a_new_job(
    server: ServerProcess, tiny_model_dir: Path, tmp_path: Path
) -> None:
    spec = patch_file(tmp_path, tiny_model_dir, ["0.3"], "op0.heads_masked: '>= 5'")
    code, first = apply(server, str(spec), "--wait", "--junit", str(tmp_path / "first.xml"))
    assert code == EXIT_FAILED and first["state"] == "FAILED"
    suite = read_junit(tmp_path / "first.xml")
    assert (suite.tests, suite.failures, suite.errors) == (2, 2, 0)

    code, second = apply(server, str(spec), "--wait", "--junit", str(tmp_path / "second.xml"))
    assert code == EXIT_FAILED and second["state"] == "FAILED"
    assert second["job_id"] != first["job_id"]
    assert second["previous_attempt"] == first["job_id"]
    properties = {p.name: p.value for p in read_junit(tmp_path / "second.xml").properties()}
    assert properties["previous_attempt"] == first["job_id"]
    with Client(server.address) as client:
        rerun = client.get_job(second["job_id"])
        assert rerun.attempts == 1 and rerun.previous_attempt == first["job_id"]
        assert client.get_job(first["job_id"]).state == jobs_pb2.JOB_STATE_FAILED
        messages = [e.message for e in client.watch(rerun.id)]
    assert messages[0] == f"job queued (re-runs {first['job_id']})"


def test_rerun_after_cancel_submits_a_new_job(
    idle_server: ServerProcess, tiny_model_dir: Path, tmp_path: Path
) -> None:
    spec = patch_file(tmp_path, tiny_model_dir, ["1.2"])
    code, queued = apply(idle_server, str(spec))
    assert code == EXIT_OK and queued["state"] == "QUEUED"
    with Client(idle_server.address) as client:
        assert client.cancel(queued["job_id"]).state == jobs_pb2.JOB_STATE_CANCELLED
    code, rerun = apply(idle_server, str(spec))
    assert code == EXIT_OK and rerun["state"] == "QUEUED"
    assert rerun["job_id"] != queued["job_id"]
    assert rerun["previous_attempt"] == queued["job_id"]
    code, again = apply(idle_server, str(spec))
    assert code == EXIT_OK and again["job_id"] == rerun["job_id"]


def test_timeout_exits_5_with_a_junit_error(
    idle_server: ServerProcess, tiny_model_dir: Path, tmp_path: Path
) -> None:
    spec = patch_file(tmp_path, tiny_model_dir, ["0.0"])
    report = tmp_path / "report.xml"
    started = time.monotonic()
    code, summary = apply(
        idle_server, str(spec), "--wait", "--timeout", "1", "--junit", str(report)
    )
    assert code == EXIT_TIMEOUT and summary["code"] == "DEADLINE_EXCEEDED"
    assert time.monotonic() - started < 10
    suite = read_junit(report)
    assert (suite.failures, suite.errors) == (0, 1)
    (error,) = next(iter(suite)).result
    assert isinstance(error, Error) and "did not end within 1 s" in error.message


@pytest.mark.parametrize(
    ("heads", "field"),
    [(["9.0"], "spec.operations[0]"), (["nonsense"], "spec.operations[0].heads")],
    ids=["refused-by-server", "refused-by-client"],
)
def test_invalid_spec_exits_2_with_a_junit_failure(
    server: ServerProcess, tiny_model_dir: Path, tmp_path: Path, heads: list[str], field: str
) -> None:
    spec = patch_file(tmp_path, tiny_model_dir, heads)
    report = tmp_path / "report.xml"
    code, summary = apply(server, str(spec), "--wait", "--junit", str(report))
    assert code == EXIT_INVALID and summary["code"] == "INVALID_ARGUMENT"
    assert summary["field"].startswith(field)
    suite = read_junit(report)
    assert (suite.tests, suite.failures, suite.errors) == (1, 1, 0)
    (failure,) = next(iter(suite)).result
    assert isinstance(failure, Failure) and failure.type == "INVALID_ARGUMENT"
    assert field in failure.message


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_server_exits_4_with_a_junit_error(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    spec = patch_file(tmp_path, tiny_model_dir, ["0.1"])
    report = tmp_path / "report.xml"
    process = apply_process(f"127.0.0.1:{free_port()}", str(spec), "--wait", "--junit", str(report))
    output, _ = process.communicate(timeout=60)
    assert process.returncode == EXIT_INFRASTRUCTURE, output
    suite = read_junit(report)
    assert (suite.failures, suite.errors) == (0, 1)
    (error,) = next(iter(suite)).result
    assert isinstance(error, Error) and error.type == "UNAVAILABLE"


@pytest.fixture
def doomed_server(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server of its own, for the test that kills it."""
    roots = (tmp_path_factory.getbasetemp(),)
    process = start_server(tmp_path / "home", "--workers", "0", model_roots=roots)
    yield process
    process.kill()


def test_server_killed_during_wait_exits_4_within_30_s(
    doomed_server: ServerProcess, tiny_model_dir: Path, tmp_path: Path
) -> None:
    spec = patch_file(tmp_path, tiny_model_dir, ["1.0"])
    report = tmp_path / "report.xml"
    process = apply_process(doomed_server.address, str(spec), "--wait", "--junit", str(report))
    try:
        assert process.stdout is not None
        submitted = process.stdout.readline()
        assert "submitted" in submitted, submitted
        killed = time.monotonic()
        doomed_server.kill()
        output, _ = process.communicate(timeout=KILL_TO_EXIT_LIMIT_S + 30)
        seconds = time.monotonic() - killed
    finally:
        process.kill()
    assert process.returncode == EXIT_INFRASTRUCTURE, output
    assert seconds < KILL_TO_EXIT_LIMIT_S, f"apply exited {seconds:.1f} s after the kill"
    suite = read_junit(report)
    assert (suite.failures, suite.errors) == (0, 1)
    (error,) = next(iter(suite)).result
    assert isinstance(error, Error) and error.type == "UNAVAILABLE"
    assert "unreachable" in error.message
