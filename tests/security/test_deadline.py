"""A job's deadline (issue 17): a job running past its ``timeout_s`` is stopped and FAILED
with the reason, and the server's worker takes the next job."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelsurgery.client import Client
from modelsurgery.server.process import start_server
from modelsurgery.v1 import jobs_pb2

pytestmark = pytest.mark.e2e


def test_a_job_past_its_deadline_fails_and_the_next_runs(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    examples = [{"prompt": "the capital of france is", "completion": " paris"}] * 256
    slow = {
        "base": str(tiny_model_dir),
        "operations": [{"method": "reft", "layers": [0], "examples": examples, "epochs": 1000}],
        "timeout_s": 5,
    }
    quick = {
        "base": str(tiny_model_dir),
        "operations": [{"method": "mask_heads", "heads": ["0.1"]}],
    }
    server = start_server(tmp_path / "home", model_roots=(tiny_model_dir,))
    try:
        with Client(server.address, timeout=60) as client:
            timed = client.wait(client.submit(slow).id, timeout=300)
            assert timed.state == jobs_pb2.JOB_STATE_FAILED
            assert "deadline exceeded" in timed.error and "timeout_s=5" in timed.error
            after = client.wait(client.submit(quick).id, timeout=300)
            assert after.state == jobs_pb2.JOB_STATE_SUCCEEDED, after.error
    finally:
        server.stop()
