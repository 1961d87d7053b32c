"""A queued job cannot move another caller's alias (issue 29): Bob submits with a new alias,
Alice creates it while his job waits; when his version is published the alias step fails
visibly (the job SUCCEEDED, its error says why) and Alice's alias stays where she put it."""

from __future__ import annotations

from pathlib import Path

import torch
from service_under_test import running_service

from modelsurgery.proto.job_state import JobState
from modelsurgery.server.auth import parse_tokens
from modelsurgery.server.engine import EngineSettings, JobEngine
from modelsurgery.server.executor import WorkerSettings
from modelsurgery.server.job_table import JobTable
from modelsurgery.server.metrics import ServerMetrics
from modelsurgery.server.outcome import ALIAS_NOT_MOVED
from modelsurgery.v1 import jobs_pb2

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789"


def test_an_alias_created_while_a_job_waits_is_not_moved_by_it(
    tmp_path: Path, tiny_llama, tiny_tokenizer
) -> None:
    tokens = parse_tokens([f"alice:{ALICE}", f"bob:writer:{BOB}"])
    with (
        running_service(tmp_path, tiny_llama, tiny_tokenizer, tokens) as server,
        server.client(ALICE) as alice,
        server.client(BOB) as bob,
    ):
        spec = {
            "base": server.version,
            "operations": [{"method": "mask_heads", "heads": ["0.1"]}],
            "alias": "team-prod",
        }
        job = bob.submit(spec)
        alice.set_alias("team-prod", server.version, expected=None)
        # Bob's job publishes on a server that then dies; the next server settles it.
        table = JobTable(tmp_path / "jobs.sqlite3")
        assert table.get(job.id).caller_role == "writer"
        table.mark_running(job.id, "no-such-host:1:gone", lease_seconds=-1)
        store = server.store
        name = "model.layers.0.self_attn.o_proj.weight"
        version = store.commit(
            server.version,
            {name: torch.zeros_like(store.tensor(server.version, name))},
            operations=[spec["operations"][0]],
            job_id=job.id,
        )
        worker = WorkerSettings(store_root=store.root, cache_dir=tmp_path / "cache")
        metrics = ServerMetrics(table)
        engine = JobEngine(table, EngineSettings(worker=worker), metrics)
        (settled,) = engine.recover_abandoned()
        assert (settled.state, settled.version_id) == (JobState.SUCCEEDED, version.id)
        shown = bob.get_job(job.id)
        assert shown.state == jobs_pb2.JOB_STATE_SUCCEEDED and shown.version_id == version.id
        assert shown.error.startswith(ALIAS_NOT_MOVED) and "another caller" in shown.error
        assert alice.get_alias("team-prod") == server.version
        metrics.close()
        table.close()
