"""A private ``apply --local`` (issue 17): the embedded server listens on a Unix socket (0600)
in a private folder (0700), opens no TCP port that answers the API, and no Ray process
inherits ``MODELSURGERY_TOKENS``."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelsurgery.client import Client
from modelsurgery.server.auth import TOKENS_ENV
from modelsurgery.server.embedded import EmbeddedServer, local_settings, private_folder
from modelsurgery.v1 import jobs_pb2

SECRET_TOKENS = "ci:ci-token-0123456789"
JOB_SERVICE = "modelsurgery.v1.JobService"


def listening_tcp_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on (its socket inodes matched in /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def serves_the_api(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=JOB_SERVICE), timeout=2
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def assert_private(socket: Path) -> None:
    assert stat.S_ISSOCK(socket.stat().st_mode)
    assert stat.S_IMODE(socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(socket.parent.stat().st_mode) == 0o700


def mask_spec(base: Path) -> dict:
    return {"base": str(base), "operations": [{"method": "mask_heads", "heads": ["0.1"]}]}


@ray.remote(num_cpus=0)
def environment_variable(name: str) -> str | None:
    return os.environ.get(name)


def test_a_deep_temp_folder_falls_back_to_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    folder = private_folder()
    try:
        assert folder.parent == Path("/tmp") and stat.S_IMODE(folder.stat().st_mode) == 0o700
    finally:
        folder.rmdir()


@pytest.mark.e2e
def test_embedded_server_is_private_and_keeps_tokens_from_ray(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKENS_ENV, SECRET_TOKENS)
    spec = tmp_path / "patch.json"
    spec.write_text(json.dumps(mask_spec(tiny_model_dir)))
    settings = local_settings(tmp_path / "home" / "store", spec, str(tiny_model_dir))
    with EmbeddedServer(settings) as embedded:
        assert embedded.address == f"unix:{embedded.socket}"
        assert_private(embedded.socket)
        assert not any(serves_the_api(p) for p in listening_tcp_ports(os.getpid()))
        assert TOKENS_ENV not in os.environ
        assert ray.get(environment_variable.remote(TOKENS_ENV), timeout=120) is None
        with Client(embedded.address, timeout=120) as client:
            job = client.wait(client.submit(mask_spec(tiny_model_dir)).id, timeout=300)
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
    assert not embedded.socket.parent.exists()


@pytest.mark.e2e
def test_apply_local_runs_over_a_private_socket(
    tiny_model_dir: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The CLI as CI runs it, with server tokens in its environment: the job succeeds, and
    while it runs the only way in is the private socket."""
    spec = tmp_path / "patch.json"
    spec.write_text(json.dumps(mask_spec(tiny_model_dir)))
    scratch = Path(tempfile.mkdtemp(prefix="ms-test-", dir="/tmp"))  # short: a socket's path
    request.addfinalizer(lambda: shutil.rmtree(scratch, ignore_errors=True))
    env = {
        **os.environ,
        "MODELSURGERY_HOME": str(tmp_path / "home"),
        "TMPDIR": str(scratch),
        TOKENS_ENV: SECRET_TOKENS,
    }
    command = [sys.executable, "-m", "modelsurgery.client.cli", "apply", str(spec), "--local"]
    process = subprocess.Popen(
        [*command, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    deadline = time.monotonic() + 300
    sockets: list[Path] = []
    while not sockets and process.poll() is None and time.monotonic() < deadline:
        sockets = list(scratch.glob("modelsurgery-local-*/modelsurgery.sock"))
        time.sleep(0.05)
    assert sockets, process.communicate(timeout=60)[1].decode()[-3000:]
    assert_private(sockets[0])
    assert not any(serves_the_api(p) for p in listening_tcp_ports(process.pid))
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err.decode()[-3000:]
    assert json.loads(out)["state"] == "SUCCEEDED"
    assert not list(scratch.glob("modelsurgery-local-*"))
