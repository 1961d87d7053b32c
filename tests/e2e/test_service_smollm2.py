"""The real server on the real model (SmolLM2-135M): a mask_heads job, and a worker killed
mid-job that the engine retries."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest
import torch
from server_process import ServerProcess, start_server
from transformers import AutoModelForCausalLM

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.client import Client
from modelsurgery.v1 import jobs_pb2

pytestmark = pytest.mark.e2e
HEAD_DIM = 64


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    process = start_server(tmp_path_factory.mktemp("home"))
    yield process
    process.stop()


def worker_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "SurgeryWorker" in cmdline:
            found.append(proc)
    return found


def test_worker_killed_mid_job_is_retried(server: ServerProcess, tmp_path: Path) -> None:
    with Client(server.address, timeout=120) as client:
        job = client.submit(
            {"base": "smollm2-135m", "operations": [{"method": "mask_heads", "heads": ["2.4"]}]}
        )
        deadline = time.monotonic() + 300
        for event in client.watch(job.id):
            if "loading base model" in event.message:
                break
            assert time.monotonic() < deadline
        workers = worker_processes()
        assert workers, "no Ray worker process found"
        for proc in workers:
            proc.kill()
        done = client.wait(job.id, timeout=600)
        messages = [e.message for e in client.watch(job.id)]
        assert any("worker process died" in m for m in messages), messages
        assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error
        assert done.attempts == 2
    assert CheckpointStore(server.home / "store").verify().ok


def test_mask_heads_on_smollm2(server: ServerProcess, tmp_path: Path) -> None:
    heads = [(3, 1), (7, 4)]
    with Client(server.address, timeout=120) as client:
        job = client.submit(
            {
                "base": "smollm2-135m",
                "operations": [
                    {"method": "mask_heads", "heads": [f"{layer}.{h}" for layer, h in heads]}
                ],
                "alias": "smollm2-masked",
            }
        )
        done = client.wait(job.id, timeout=600)
        assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error
        version = client.get_version("smollm2-masked")
        assert version.version.changed_tensors == 2
        folder = client.download(done.version_id, tmp_path / "export")
        before, after = client.generate(done.version_id, ["The capital of France is"])[0], None
        assert isinstance(before, str) and before
        after = client.generate(version.lineage[1], ["The capital of France is"])[0]
        assert isinstance(after, str) and after
    model = AutoModelForCausalLM.from_pretrained(folder)
    for layer, head in heads:
        weight = model.model.layers[layer].self_attn.o_proj.weight
        assert torch.count_nonzero(weight[:, head * HEAD_DIM : (head + 1) * HEAD_DIM]) == 0
        assert torch.count_nonzero(weight[:, :HEAD_DIM]) > 0
