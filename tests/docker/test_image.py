"""The image built from this checkout and run as users run it: tini as PID 1, uid 10001, the
data mounted read-only, a port that is not the default, tokens; a ROME job on SmolLM2-135M
submitted from the host with the SDK, its version, diff and export checked. A second container
on TLS without data becomes healthy and says which methods lack data; the data shipped the
classic builder's way is all there. ``make test-docker``; skipped, saying why, without a
daemon."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e.test_service_tls import write_certificates

from docker.harness import (
    DATA_IN_IMAGE,
    Container,
    build_data_image,
    build_image,
    daemon_problem,
    docker,
    image_tag,
    start_container,
    wait_healthy,
)
from modelsurgery.client import Client
from modelsurgery.editing.data import shared_data_dir, shared_data_path
from modelsurgery.v1 import jobs_pb2

pytestmark = [pytest.mark.docker, pytest.mark.timeout(3600)]
CHEAP_ROME = {"stats_samples": 32, "stats_window": 128, "evaluate_perplexity": False}
EDITED = "model.layers.5.mlp.down_proj.weight"
MISSING_DATA = "shared data missing"


@pytest.fixture(scope="module")
def image() -> str:
    problem = daemon_problem()
    if problem:
        pytest.skip(f"docker test skipped: {problem}")
    tag = image_tag()
    build_image(tag)
    return tag


@pytest.fixture
def containers() -> Iterator[list[Container]]:
    started: list[Container] = []
    yield started
    for container in started:
        container.remove()


def test_rome_job_in_the_container(image: str, containers: list[Container], tmp_path: Path) -> None:
    token = secrets.token_hex(16)
    container = start_container(
        image,
        env={"MODELSURGERY_TOKENS": f"docker-test:{token}"},
        mounts={shared_data_dir(): DATA_IN_IMAGE},
    )
    containers.append(container)
    startup = wait_healthy(container)
    print(f"\nserving after {startup.serving_s:.1f} s, healthy after {startup.healthy_s:.1f} s")
    assert container.port != 50051
    assert container.exec("id", "-u") == "10001"
    assert container.exec("cat", "/proc/1/comm") == "tini"
    assert MISSING_DATA not in container.logs()

    fact = json.loads(shared_data_path("counterfact/counterfact-dev.json").read_text())[0]
    spec = {
        "base": "smollm2-135m",
        "operations": [{"method": "rome", "facts": [fact], **CHEAP_ROME}],
    }
    with Client(container.address, token=token, timeout=120) as client:
        job = client.submit(spec)
        done = client.wait(job.id, timeout=1200)
        assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, (done.error, container.logs()[-4000:])
        print(f"job {done.id}: version {done.version_id}, metrics {dict(done.metrics)}")
        version = client.get_version(done.version_id)
        assert version.version.changed_tensors == 1
        changes = client.diff(version.lineage[1], done.version_id)
        assert [change.name for change in changes] == [EDITED]
        folder = client.download(done.version_id, tmp_path / "export")
    manifest = json.loads((folder / "modelsurgery.json").read_text())["manifest"]
    assert manifest["id"] == done.version_id
    assert [op["method"] for op in manifest["operations"]] == ["rome"]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == 30


def test_tls_container_without_data(
    image: str, containers: list[Container], tmp_path: Path
) -> None:
    """Started with TLS on another port, the HEALTHCHECK still finds it; with no data mounted,
    its start log names what cannot run."""
    ca, cert, key = write_certificates(tmp_path)
    for path in (tmp_path, ca, cert, key):  # readable by the container's uid 10001
        path.chmod(0o755 if path.is_dir() else 0o644)
    container = start_container(
        image,
        "--tls-cert",
        "/certs/server.pem",
        "--tls-key",
        "/certs/server.key",
        mounts={tmp_path: "/certs"},
    )
    containers.append(container)
    tls = {"cert": str(cert), "key": str(key), "client_ca": None}
    startup = wait_healthy(container, tls=tls)
    print(
        f"\nTLS: serving after {startup.serving_s:.1f} s, healthy after {startup.healthy_s:.1f} s"
    )
    logs = container.logs()
    assert MISSING_DATA in logs and "ROME/MEMIT" in logs, logs[-4000:]


def test_data_shipped_with_the_classic_builder(image: str) -> None:
    """The documented classic-builder way: a data image named by ``DATA_IMAGE``; the image
    then holds every data set the server checks for at start."""
    data_tag, shipped = f"{image}-data-only", f"{image}-with-data"
    build_data_image(data_tag, shared_data_dir())
    build_image(shipped, "--build-arg", f"DATA_IMAGE={data_tag}")
    check = "from modelsurgery.server.shared_data import missing_data; print(missing_data())"
    found = docker(
        "run", "--rm", "--network", "host", "--entrypoint", "python", shipped, "-c", check
    )
    assert found == "{}"
    bare = docker("run", "--rm", "--network", "host", "--entrypoint", "python", image, "-c", check)
    assert "wikitext-2/valid.tokens" in bare
