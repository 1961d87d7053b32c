"""A server with TLS, bearer tokens and Prometheus metrics: the async SDK, the CLI's apply
(exit codes, --json) and the metrics endpoint against it."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import urllib.request
from pathlib import Path

import pytest
from conftest import build_tiny_tokenizer, tiny_model
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from modelsurgery.client import AsyncClient, Client, Unauthenticated
from modelsurgery.client.cli import app
from modelsurgery.server.process import ServerProcess, start_server
from modelsurgery.v1 import jobs_pb2

pytestmark = pytest.mark.e2e
TOKEN = "tls-token-0123456789"


def write_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modelsurgery test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[ServerProcess, Path, Path]:
    home = tmp_path_factory.mktemp("tls-home")
    ca, cert, key = write_certificates(home)
    model = home / "tiny"
    tiny_model("llama", seed=5).save_pretrained(model)
    build_tiny_tokenizer().save_pretrained(model)
    server = start_server(
        home,
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--metrics-port",
        "0",
        env={"MODELSURGERY_TOKENS": TOKEN},
        tls_ca=ca,
        model_roots=(model,),
    )
    yield server, ca, model
    server.stop()


def test_async_client_over_tls(setup: tuple[ServerProcess, Path, Path]) -> None:
    server, ca, model = setup

    async def scenario() -> jobs_pb2.Job:
        async with AsyncClient(server.address, token=TOKEN, root_certificates=ca) as client:
            spec = {"base": str(model), "operations": [{"method": "mask_heads", "heads": ["1.2"]}]}
            job = await client.submit(spec)
            events = []
            done = await client.wait(job.id, progress=events.append, timeout=300)
            assert events and events[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED
            versions = [v async for v in client.list_versions()]
            assert done.version_id in {v.id for v in versions}
            return done

    assert asyncio.run(scenario()).state == jobs_pb2.JOB_STATE_SUCCEEDED
    with (
        Client(server.address, root_certificates=ca, timeout=30) as anonymous,
        pytest.raises(Unauthenticated),
    ):
        anonymous.get_job("job-x")


def test_cli_apply_exit_codes_and_json(
    setup: tuple[ServerProcess, Path, Path], tmp_path: Path
) -> None:
    server, ca, model = setup
    options = ["--server", server.address, "--token", TOKEN, "--tls-ca", str(ca)]
    good = tmp_path / "good.yaml"
    good.write_text(
        f"base: {model}\noperations:\n  - method: mask_heads\n    heads: ['0.0']\n"
        "gates:\n  op0.heads_masked: '>= 1'\nalias: cli-good\n"
    )
    result = CliRunner().invoke(app, ["apply", str(good), "--wait", "--json", *options])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["state"] == "SUCCEEDED" and summary["version_id"]
    assert summary["metrics"]["op0.heads_masked"] == 1.0

    gated = tmp_path / "gated.yaml"
    gated.write_text(good.read_text().replace("'>= 1'", "'>= 3'"))
    result = CliRunner().invoke(app, ["apply", str(gated), "--wait", "--json", *options])
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["state"] == "FAILED" and summary["version_id"] is None
    assert summary["gates"][0]["passed"] is False

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {model}\noperations:\n  - method: mask_heads\n    heads: ['9.0']\n")
    result = CliRunner().invoke(app, ["apply", str(bad), "--wait", "--json", *options])
    assert result.exit_code == 2
    assert json.loads(result.stdout)["code"] == "INVALID_ARGUMENT"


def test_metrics_endpoint(setup: tuple[ServerProcess, Path, Path]) -> None:
    server, _, _ = setup
    assert server.metrics_port
    body = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=30)
        .read()
        .decode()
    )
    assert 'modelsurgery_jobs{state="SUCCEEDED"}' in body
    assert "modelsurgery_queue_depth" in body
    assert "modelsurgery_job_duration_seconds_count" in body
