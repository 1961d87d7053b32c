"""Start the real server (`modelsurgery serve`) as a child process and wait until it is healthy:
used by the demo, the benchmarks and the end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

STARTUP_TIMEOUT_S = 180


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    home: Path
    port: int
    log: Path
    metrics_port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL the whole process group: the server and the Ray processes it started."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=60)


def start_server(
    home: Path,
    *extra_args: str,
    env: dict[str, str] | None = None,
    tls_ca: Path | None = None,
    model_roots: Sequence[Path] = (),
) -> ServerProcess:
    """``modelsurgery serve`` on a free loopback port with state under ``home``; logs go to
    ``home/server.log``. The child gets its own process group, so ``kill`` also ends Ray.
    ``model_roots`` are passed as ``--model-root`` (default: ``home/models`` only)."""
    home.mkdir(parents=True, exist_ok=True)
    ready = home / f"port-{time.monotonic_ns()}"
    log = home / "server.log"
    command = [
        sys.executable,
        "-m",
        "modelsurgery.client.cli",
        "serve",
        "--port",
        "0",
        "--store",
        str(home / "store"),
        "--ready-file",
        str(ready),
        "--num-cpus",
        "2",
        *(arg for root in model_roots for arg in ("--model-root", str(root))),
        *extra_args,
    ]
    process = subprocess.Popen(
        command,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {}), "MODELSURGERY_HOME": str(home)},
        start_new_session=True,
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not ready.exists():
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"server did not start:\n{log.read_text()}")
        time.sleep(0.2)
    info = json.loads(ready.read_text())
    server = ServerProcess(process, home, info["port"], log, info.get("metrics_port"))
    channel = (
        grpc.secure_channel(server.address, grpc.ssl_channel_credentials(tls_ca.read_bytes()))
        if tls_ca is not None
        else grpc.insecure_channel(server.address)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=30).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    return server
