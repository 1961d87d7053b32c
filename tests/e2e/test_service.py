"""The real server (separate process, embedded Ray, real port) driven through the SDK."""

from __future__ import annotations

import json
import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import grpc
import pytest
import torch
from conftest import build_tiny_tokenizer, tiny_model
from google.protobuf import struct_pb2
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.client import (
    Client,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)
from modelsurgery.client.cli import app
from modelsurgery.client.connection import DownloadWriter
from modelsurgery.client.errors import from_rpc_error
from modelsurgery.server.process import ServerProcess, start_server
from modelsurgery.v1 import jobs_pb2, jobs_pb2_grpc

pytestmark = pytest.mark.e2e
TOKEN = "e2e-secret-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    home = tmp_path_factory.mktemp("home")
    tokens = home / "tokens.txt"
    tokens.write_text(f"ci:{TOKEN}\n")
    process = start_server(
        home,
        "--tokens-file",
        str(tokens),
        "--max-queued",
        "50",
        model_roots=(tmp_path_factory.getbasetemp(),),
    )
    yield process
    process.stop()


@pytest.fixture
def client(server: ServerProcess) -> Client:
    with Client(server.address, token=TOKEN, timeout=120) as c:
        yield c


def mask_spec(base: Path | str, heads: list[str], **extra: object) -> dict:
    return {
        "base": str(base),
        "operations": [{"method": "mask_heads", "heads": heads}],
        **extra,
    }


def test_mask_heads_job_end_to_end(client: Client, tiny_model_dir: Path, tmp_path: Path) -> None:
    job = client.submit(mask_spec(tiny_model_dir, ["0.1", "1.3"], alias="masked"))
    assert job.state == jobs_pb2.JOB_STATE_QUEUED
    events = list(client.watch(job.id))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert any(e.kind == "progress" for e in events)
    job = client.get_job(job.id)
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert client.get_alias("masked") == job.version_id

    info = client.get_version(job.version_id)
    assert len(info.lineage) == 2 and info.lineage[0] == job.version_id
    assert info.version.changed_tensors == 2

    folder = client.download(job.version_id, tmp_path / "export", chunk_size=4096)
    model = AutoModelForCausalLM.from_pretrained(folder)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    for layer, head in ((0, 1), (1, 3)):
        weight = model.model.layers[layer].self_attn.o_proj.weight
        cols = slice(head * head_dim, (head + 1) * head_dim)
        assert torch.count_nonzero(weight[:, cols]) == 0
        others = torch.ones(weight.shape[1], dtype=torch.bool)
        others[cols] = False
        reference = original.model.layers[layer].self_attn.o_proj.weight
        assert torch.equal(weight[:, others], reference[:, others])

    with pytest.raises(NotFound) as err:
        client.get_artifact(job.version_id, "head_scores.json")
    assert err.value.field == "name"

    changes = client.diff(info.lineage[1], job.version_id)
    assert {c.name for c in changes} == {
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
    }


def test_download_resumes_from_offset(client: Client, tiny_model_dir: Path, tmp_path: Path) -> None:
    job = client.wait(client.submit(mask_spec(tiny_model_dir, ["0.0"])).id)
    full = client.download(job.version_id, tmp_path / "full")
    partial = tmp_path / "partial"
    shutil.copytree(full, partial)
    weights = "model.safetensors"
    data = (full / weights).read_bytes()
    (partial / weights).write_bytes(data[:1000])
    for later in sorted(p.name for p in full.iterdir() if p.name > weights):
        (partial / later).unlink()
    writer = DownloadWriter(partial)
    writer.path, writer.offset = weights, 1000
    for message in client._checkpoints.DownloadVersion(
        writer.request(job.version_id, 4096), metadata=client.settings.metadata()
    ):
        writer.write(message)
    writer.verify()
    assert (partial / weights).read_bytes() == data


def test_idempotent_submit(client: Client, tiny_model_dir: Path) -> None:
    spec = mask_spec(tiny_model_dir, ["1.0"])
    first = client.submit(spec, request_id="req-idem-1")
    second = client.submit(spec, request_id="req-idem-1")
    assert first.id == second.id
    with pytest.raises(InvalidArgument) as err:
        client.submit(mask_spec(tiny_model_dir, ["1.1"]), request_id="req-idem-1")
    assert err.value.field == "request_id"
    client.wait(first.id)


def test_cancel(client: Client, tiny_model_dir: Path) -> None:
    job = client.wait(client.submit(mask_spec(tiny_model_dir, ["0.2"])).id)
    with pytest.raises(FailedPrecondition):
        client.cancel(job.id)
    with pytest.raises(NotFound):
        client.cancel("job-does-not-exist")


def raw_submit(client: Client, spec: dict) -> grpc.RpcError:
    """Send a spec as a raw proto, bypassing the SDK's own validation, and return the error."""
    operations = []
    for op in spec["operations"]:
        params = struct_pb2.Struct()
        params.update({k: v for k, v in op.items() if k != "method"})
        operations.append(jobs_pb2.Operation(method=op["method"], params=params))
    message = jobs_pb2.JobSpec(
        base=spec["base"],
        operations=operations,
        gates=spec.get("gates", {}),
        alias=spec.get("alias", ""),
    )
    with grpc.insecure_channel(client.settings.address) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.SubmitJob(
                jobs_pb2.SubmitJobRequest(spec=message),
                metadata=client.settings.metadata(),
                timeout=60,
            )
    return err.value


STEER_PAIRS = [{"positive": "good", "negative": "bad"}, {"positive": "yes", "negative": "no"}]


@pytest.mark.parametrize(
    ("spec_update", "field"),
    [
        ({"operations": [{"method": "no_such_method"}]}, "spec.operations[0].method"),
        ({"operations": []}, "spec.operations"),
        (
            {"operations": [{"method": "mask_heads", "heads": ["0.1"], "bogus": 1}]},
            "spec.operations[0].bogus",
        ),
        ({"operations": [{"method": "mask_heads", "heads": ["7.1"]}]}, "spec.operations[0]"),
        ({"operations": [{"method": "mask_heads", "heads": ["0.9"]}]}, "spec.operations[0]"),
        ({"gates": {"perplexity_ratio": "about 1"}}, "spec.gates.perplexity_ratio"),
        ({"base": "/definitely/not/a/model"}, "spec.base"),
        (
            {
                "operations": [
                    {"method": "steer", "pairs": STEER_PAIRS, "bake": False},
                    {"method": "mask_heads", "heads": ["0.1"]},
                ]
            },
            "spec.operations[1]",
        ),
        ({"alias": "bad alias!"}, "spec.alias"),
    ],
)
def test_bad_specs_are_invalid_argument(
    client: Client, tiny_model_dir: Path, spec_update: dict, field: str
) -> None:
    jobs_before = {job.id for job in client.list_jobs()}
    error = raw_submit(client, {**mask_spec(tiny_model_dir, ["0.1"]), **spec_update})
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    typed = from_rpc_error(error)
    assert typed.field is not None and typed.field.startswith(field), typed
    assert {job.id for job in client.list_jobs()} == jobs_before  # a rejected spec is no job


def test_unauthenticated_rejected(server: ServerProcess, tiny_model_dir: Path) -> None:
    for token in (None, "wrong-token"):
        with Client(server.address, token=token, timeout=30) as anonymous:
            with pytest.raises(Unauthenticated):
                anonymous.submit(mask_spec(tiny_model_dir, ["0.1"]))
            with pytest.raises(Unauthenticated):
                list(anonymous.list_versions())
            with pytest.raises(Unauthenticated):
                list(anonymous.watch("job-x"))


def test_failed_gate_publishes_nothing(client: Client, tiny_model_dir: Path) -> None:
    spec = mask_spec(
        tiny_model_dir, ["0.3"], gates={"op0.heads_masked": ">= 5"}, alias="gated-alias"
    )
    job = client.wait(client.submit(spec).id)
    assert job.state == jobs_pb2.JOB_STATE_FAILED
    assert not job.version_id
    assert [(g.metric, g.passed, g.value) for g in job.gates] == [("op0.heads_masked", False, 1.0)]
    with pytest.raises(NotFound):
        client.get_alias("gated-alias")


def test_alias_compare_and_swap(client: Client, tiny_model_dir: Path) -> None:
    a = client.wait(client.submit(mask_spec(tiny_model_dir, ["1.2"])).id).version_id
    b = client.wait(client.submit(mask_spec(tiny_model_dir, ["1.1"])).id).version_id
    client.set_alias("cas-test", a, expected=None)
    with pytest.raises(FailedPrecondition):
        client.set_alias("cas-test", b, expected=None)
    client.set_alias("cas-test", b, expected=a)
    assert client.get_alias("cas-test") == b
    reverted = client.revert(b)
    assert reverted.parent_id == b
    assert [c.name for c in client.diff(b, reverted.id)]
    assert client.diff(client.get_version(b).lineage[1], reverted.id) == []


def test_kill_server_mid_job_and_restart(tiny_model_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    server = start_server(home, model_roots=(tiny_model_dir,))
    try:
        with Client(server.address, timeout=60) as client:
            spec = mask_spec(tiny_model_dir, ["0.1"])
            spec["operations"][0]["evaluate_perplexity"] = True
            job = client.submit(spec)
            deadline = time.monotonic() + 120
            while client.get_job(job.id).state != jobs_pb2.JOB_STATE_RUNNING:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        server.kill()
        server = start_server(home, model_roots=(tiny_model_dir,))
        with Client(server.address, timeout=60) as client:
            recovered = client.wait(job.id, timeout=300)
            assert recovered.state in (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED)
            messages = [e.message for e in client.watch(job.id)]
            assert any("restarted" in m for m in messages)
            if recovered.state == jobs_pb2.JOB_STATE_SUCCEEDED:
                # The killed server's worker outlives it and may publish before the lease
                # expires (the job is then settled with that version), else a re-run does.
                assert recovered.attempts == 2 or any("restarted; version" in m for m in messages)
    finally:
        server.stop()
    report = CheckpointStore(home / "store").verify()
    assert report.ok, report.problems


def test_cli_batch_and_idempotent_apply_with_junit(
    server: ServerProcess, tiny_model_dir: Path, tmp_path: Path
) -> None:
    options = ["--server", server.address, "--token", TOKEN]
    other = tmp_path / "other-model"
    tiny_model("llama", seed=4).save_pretrained(other)
    build_tiny_tokenizer().save_pretrained(other)
    spec = tmp_path / "patch.yaml"
    spec.write_text(
        f"base: {tiny_model_dir}\noperations:\n  - method: mask_heads\n    heads: ['1.1']\n"
        "gates:\n  op0.heads_masked: '>= 1'\n"
    )
    result = CliRunner().invoke(
        app,
        [
            "batch",
            str(spec),
            "--base",
            str(tiny_model_dir),
            "--base",
            str(other),
            "--json",
            "--concurrency",
            "2",
            *options,
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["label"] for r in rows] == [str(tiny_model_dir), str(other)]
    assert all(r["state"] == "SUCCEEDED" for r in rows)
    assert rows[0]["version_id"] != rows[1]["version_id"]

    report = tmp_path / "junit.xml"
    first = CliRunner().invoke(
        app, ["apply", str(spec), "--json", "--junit", str(report), *options]
    )
    assert first.exit_code == 0, first.output
    suite = ET.parse(report).getroot()
    assert suite.get("failures") == "0"
    assert [c.get("name") for c in suite.iter("testcase")] == ["gate op0.heads_masked", "job"]
    again = CliRunner().invoke(app, ["apply", str(spec), "--wait", "--json", *options])
    assert json.loads(again.stdout)["job_id"] == json.loads(first.stdout)["job_id"]
    fresh = CliRunner().invoke(app, ["apply", str(spec), "--wait", "--json", "--new", *options])
    fresh_summary = json.loads(fresh.stdout)
    assert fresh_summary["job_id"] != json.loads(first.stdout)["job_id"]
    assert fresh_summary["version_id"] == json.loads(first.stdout)["version_id"]


def test_a_queued_job_builds_on_the_version_its_alias_named_at_submit(
    client: Client, tiny_model_dir: Path
) -> None:
    """Admission pins the base: the alias moves while the job waits behind another, and the
    job still builds on (and was checked against) the version the alias named at submit."""
    other = client.wait(client.submit(mask_spec(tiny_model_dir, ["1.0"])).id)
    assert other.state == jobs_pb2.JOB_STATE_SUCCEEDED, other.error
    root = client.get_version(other.version_id).version.parent_id
    client.set_alias("pinned-base", root)
    blocker = client.submit(
        {
            "base": root,
            "operations": [{"method": "prune", "calibration_samples": 4, "calibration_seqlen": 16}],
            "gates": {"op0.perplexity_ratio": "> 0"},
        }
    )
    queued = client.submit(mask_spec("pinned-base", ["0.1"]))
    client.set_alias("pinned-base", other.version_id)
    done = client.wait(queued.id)
    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error
    assert client.get_version(done.version_id).version.parent_id == root
    assert client.wait(blocker.id).state == jobs_pb2.JOB_STATE_SUCCEEDED
