"""The image built and run through the Docker CLI, for the docker test and
``benchmarks/image.py``: containers share the host network (a daemon without a bridge, as on
this workplace's machines, needs it; elsewhere it is harmless) and the server binds loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from modelsurgery.server.health_probe import Probe, probe_target

ROOT = Path(__file__).resolve().parents[2]
IMAGE_ENV = "MODELSURGERY_TEST_IMAGE"
DEFAULT_IMAGE = "modelsurgery:test"
# Where pip inside the build finds torch: the PyTorch CPU index unless this names another.
TORCH_INDEX_ENV = "TORCH_INDEX_URL"
DATA_IN_IMAGE = "/opt/modelsurgery/data"
STATE_POLL_S = 0.5
DATA_DOCKERFILE = "FROM scratch\nCOPY . /\n"


def docker(*args: str, timeout: float = 120) -> str:
    """Run ``docker ARGS``; its stdout, or RuntimeError with its stderr."""
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:2])} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout.strip()


def daemon_problem() -> str | None:
    """Why no image can be built here (no CLI, no daemon answering), or None."""
    if shutil.which("docker") is None:
        return "no docker command on PATH"
    try:
        docker("info", "--format", "{{.ServerVersion}}", timeout=20)
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        return f"no Docker daemon answers ({error})"
    return None


def image_tag() -> str:
    return os.environ.get(IMAGE_ENV, DEFAULT_IMAGE)


def build_image(tag: str, *build_args: str, timeout: float = 3600) -> float:
    """``docker build`` of this checkout (BuildKit when buildx is there, else the classic
    builder); the seconds it took. Output goes to the caller's stdout as it comes."""
    env = dict(os.environ)
    has_buildx = subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode
    if has_buildx != 0:
        env["DOCKER_BUILDKIT"] = "0"
    extra = (
        [f"--build-arg=TORCH_INDEX_URL={env[TORCH_INDEX_ENV]}"] if env.get(TORCH_INDEX_ENV) else []
    )
    command = ["docker", "build", "--network", "host", *extra, *build_args, "-t", tag, str(ROOT)]
    started = time.monotonic()
    subprocess.run(command, env=env, check=True, timeout=timeout)
    return time.monotonic() - started


def build_data_image(tag: str, folder: Path) -> None:
    """An image holding ``folder`` at its root: the classic builder's way to ship the data
    sets (``--build-arg DATA_IMAGE=tag``), where BuildKit would take ``--build-context``."""
    subprocess.run(
        ["docker", "build", "--quiet", "-t", tag, "-f", "-", str(folder)],
        input=DATA_DOCKERFILE,
        text=True,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
        check=True,
        capture_output=True,
    )


def image_size(tag: str) -> int:
    return int(docker("image", "inspect", "--format", "{{.Size}}", tag))


def free_port() -> int:
    """A loopback port free now and not the image's default."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Container:
    id: str
    port: int
    started: float = field(default_factory=time.monotonic)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def inspect(self, template: str) -> str:
        return docker("inspect", "--format", template, self.id)

    def logs(self) -> str:
        done = subprocess.run(["docker", "logs", self.id], capture_output=True, text=True)
        return done.stdout + done.stderr

    def exec(self, *command: str) -> str:
        return docker("exec", self.id, *command)

    def remove(self) -> None:
        subprocess.run(["docker", "rm", "--force", self.id], capture_output=True, timeout=120)


def start_container(
    tag: str,
    *serve_args: str,
    env: dict[str, str] | None = None,
    mounts: dict[Path, str] | None = None,
) -> Container:
    """A detached container of ``tag`` serving on a free loopback port of the host, with
    ``serve_args`` after the image's own; ``mounts`` are read-only (host path -> container)."""
    port = free_port()
    command = ["run", "--detach", "--network", "host", "--shm-size", "2g"]
    for name, value in (env or {}).items():
        command += ["--env", f"{name}={value}"]
    for source, target in (mounts or {}).items():
        command += ["--volume", f"{source.resolve()}:{target}:ro"]
    started = time.monotonic()
    identifier = docker(*command, tag, "--host", "127.0.0.1", "--port", str(port), *serve_args)
    return Container(identifier, port, started)


@dataclass
class Startup:
    """Seconds from ``docker run`` until the server answered SERVING to a probe from the
    host, and until Docker's own HEALTHCHECK reported the container healthy."""

    serving_s: float
    healthy_s: float


def wait_healthy(container: Container, timeout: float = 600, tls: dict | None = None) -> Startup:
    """Poll the server from the host and Docker's health status until both say so."""
    probe = Probe(probe_target(container.address), tls)
    serving_s = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if serving_s is None and probe.serving(timeout=2):
            serving_s = time.monotonic() - container.started
        state = container.inspect("{{.State.Status}} {{.State.Health.Status}}")
        if state == "running healthy":
            healthy_s = time.monotonic() - container.started
            return Startup(serving_s if serving_s is not None else healthy_s, healthy_s)
        if not state.startswith("running") or state.endswith("unhealthy"):
            break
        time.sleep(STATE_POLL_S)
    raise AssertionError(f"container not healthy ({state}); its log:\n{container.logs()[-6000:]}")
