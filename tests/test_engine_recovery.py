"""A server taking over the jobs of one that is gone: the publish is the commit point (a job
whose version exists is SUCCEEDED with it, its alias moved), others are re-queued or failed,
and jobs of a live server are left alone. Runs the engine's recovery without starting Ray."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_tokenizer, tiny_model

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.proto.job_state import JobState
from modelsurgery.server import job_table as jt
from modelsurgery.server.engine import EngineSettings, JobEngine
from modelsurgery.server.executor import WorkerSettings
from modelsurgery.server.leases import owner_is_dead, server_identity
from modelsurgery.server.metrics import ServerMetrics

DEAD_OWNER = "no-such-host-owner:1:gone"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[JobEngine]:
    table = jt.JobTable(tmp_path / "jobs.sqlite3")
    metrics = ServerMetrics(table)
    settings = EngineSettings(
        worker=WorkerSettings(store_root=tmp_path / "store", cache_dir=tmp_path / "cache"),
        max_attempts=2,
    )
    yield JobEngine(table, settings, metrics)
    metrics.close()
    table.close()


def running_job(engine: JobEngine, base: str, *, owner: str, lease: float) -> jt.JobRecord:
    spec = {
        "base": base,
        "operations": [{"method": "mask_heads", "heads": ["0.1"]}],
        "alias": "prod",
        "gates": {"parameter_ratio": ">= 1"},
    }
    job, _ = engine.table.submit(request_id="", caller="alice", spec=spec, fingerprint="f")
    return engine.table.mark_running(job.id, owner, lease_seconds=lease)


def test_a_published_job_is_recorded_succeeded_with_its_version(engine: JobEngine) -> None:
    store = engine.store
    root = store.import_model(tiny_model("llama"), build_tiny_tokenizer(), reference="tiny")
    job = running_job(engine, root.id, owner=DEAD_OWNER, lease=-1)
    name = "model.layers.0.self_attn.o_proj.weight"
    published = store.commit(
        root.id,
        {name: torch.zeros_like(store.tensor(root.id, name))},
        operations=[{"method": "mask_heads"}],
        metrics={"parameter_ratio": 1.0},
        job_id=job.id,
    )
    (settled,) = engine.recover_abandoned()
    assert (settled.state, settled.version_id) == (JobState.SUCCEEDED, published.id)
    assert settled.metrics == {"parameter_ratio": 1.0}
    assert settled.gates[0]["passed"]
    assert store.get_alias("prod") == published.id
    assert CheckpointStore(store.root).version_of_job(job.id).id == published.id


def test_unpublished_jobs_are_requeued_then_failed(engine: JobEngine) -> None:
    job = running_job(engine, "tiny", owner=DEAD_OWNER, lease=-1)
    (requeued,) = engine.recover_abandoned()
    assert (
        requeued.state == JobState.QUEUED
        and "restarted" in engine.table.events_after(job.id, 0)[-1].message
    )
    engine.table.mark_running(job.id, DEAD_OWNER, lease_seconds=-1)
    (failed,) = engine.recover_abandoned()
    assert failed.state == JobState.FAILED and "2 attempts" in failed.error


def test_jobs_of_a_live_server_are_left_alone(engine: JobEngine) -> None:
    job = running_job(engine, "tiny", owner=server_identity(), lease=60)
    assert engine.recover_abandoned() == []
    assert engine.table.get(job.id).state == JobState.RUNNING


def test_owner_liveness() -> None:
    assert not owner_is_dead(server_identity())
    assert owner_is_dead("")
    this_process_before = server_identity()
    assert owner_is_dead(this_process_before.rsplit(":", 1)[0] + ":earlier")
    assert not owner_is_dead("some-other-host:1:abc")
