"""A server taking over the jobs of one that is gone: the publish is the commit point (a job
whose version exists is SUCCEEDED with it, its alias moved), others are re-queued or failed,
and jobs of a live server are left alone. Runs the engine's recovery without starting Ray."""

from __future__ import annotations

import asyncio
import logging
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from conftest import build_tiny_tokenizer, tiny_model
from ray.exceptions import RayActorError

from modelsurgery.checkpoints import CheckpointStore, Manifest
from modelsurgery.proto.job_state import JobState
from modelsurgery.server import job_table as jt
from modelsurgery.server.engine import EngineSettings, JobEngine
from modelsurgery.server.executor import WorkerSettings
from modelsurgery.server.failures import caller_status
from modelsurgery.server.leases import owner_is_dead, server_identity
from modelsurgery.server.metrics import ServerMetrics
from modelsurgery.server.outcome import JobOutcome

DEAD_OWNER = "no-such-host-owner:1:gone"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[JobEngine]:
    table = jt.JobTable(tmp_path / "jobs.sqlite3")
    metrics = ServerMetrics(table)
    settings = EngineSettings(
        worker=WorkerSettings(store_root=tmp_path / "store", cache_dir=tmp_path / "cache"),
        max_attempts=2,
        settle_retry_seconds=0.0,
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


def publish(store: CheckpointStore, job_id: str) -> Manifest:
    """What a worker leaves when it dies (or its server does) right after publishing."""
    root = store.import_model(tiny_model("llama"), build_tiny_tokenizer(), reference="tiny")
    name = "model.layers.0.self_attn.o_proj.weight"
    return store.commit(
        root.id,
        {name: torch.zeros_like(store.tensor(root.id, name))},
        operations=[{"method": "mask_heads"}],
        metrics={"parameter_ratio": 1.0},
        job_id=job_id,
    )


def dead_local_owner() -> str:
    """The identity of a server process of this host that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return f"{socket.gethostname()}:{process.pid}:gone"


def test_a_published_job_is_recorded_succeeded_with_its_version(engine: JobEngine) -> None:
    store = engine.store
    job = running_job(engine, "tiny", owner=DEAD_OWNER, lease=-1)
    published = publish(store, job.id)
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


def test_a_worker_that_dies_after_publishing_leaves_its_job_succeeded(engine: JobEngine) -> None:
    job = running_job(engine, "tiny", owner=engine.identity, lease=60)
    published = publish(engine.store, job.id)
    engine._handle_worker_death(job, RayActorError())
    settled = engine.table.get(job.id)
    assert (settled.state, settled.version_id) == (JobState.SUCCEEDED, published.id)
    assert settled.gates[0]["passed"] and engine.store.get_alias("prod") == published.id


def test_a_worker_death_after_a_takeover_moves_no_alias(engine: JobEngine) -> None:
    job = running_job(engine, "tiny", owner=engine.identity, lease=-1)
    engine.table.claim_abandoned("other-host:1:new", 60, lambda job_id, owner: False)
    publish(engine.store, job.id)
    engine._handle_worker_death(job, RayActorError())
    assert engine.table.get(job.id).state == JobState.RUNNING
    assert engine.store.get_alias("prod") is None


def test_a_dead_server_pid_waits_for_its_lease_unless_the_job_published(
    engine: JobEngine,
) -> None:
    """Its workers run in Ray's processes and may still publish: re-queueing before the lease
    expires could run the job twice; a published job is settled at once."""
    owner = dead_local_owner()
    unpublished = running_job(engine, "tiny", owner=owner, lease=60)
    done = running_job(engine, "tiny", owner=owner, lease=60)
    published = publish(engine.store, done.id)
    (settled,) = engine.recover_abandoned()
    assert (settled.id, settled.state, settled.version_id) == (
        done.id,
        JobState.SUCCEEDED,
        published.id,
    )
    assert engine.table.get(unpublished.id).lease_owner == owner


class FinishedActor:
    """A worker actor (as Ray hands it to the engine) whose job ends with ``outcome``."""

    def __init__(self, outcome: JobOutcome) -> None:
        self.outcome = outcome
        self.run_job = self
        self.cancel = self

    def remote(self, *args: Any) -> AsyncIterator[Any]:
        async def result() -> JobOutcome:
            return self.outcome

        async def refs() -> AsyncIterator[Any]:
            yield result()

        return refs()


def fail_writes(engine: JobEngine, monkeypatch: pytest.MonkeyPatch, times: int) -> None:
    """The job table's terminal write fails ``times`` times as on a full disk, then works."""
    finish = engine.table.finish
    failures = iter(range(times))

    def full_disk(*args: Any, **kwargs: Any) -> jt.JobRecord:
        if next(failures, None) is not None:
            raise sqlite3.OperationalError("database or disk is full")
        return finish(*args, **kwargs)

    monkeypatch.setattr(engine.table, "finish", full_disk)


def test_a_result_written_on_a_full_disk_is_retried(
    engine: JobEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = running_job(engine, "tiny", owner=engine.identity, lease=60)
    fail_writes(engine, monkeypatch, times=3)
    outcome = JobOutcome(JobState.FAILED, error="gates failed: parameter_ratio not measured")
    asyncio.run(engine._run(job, FinishedActor(outcome)))
    settled = engine.table.get(job.id)
    assert (settled.state, settled.error) == (JobState.FAILED, outcome.error)


def test_the_tick_settles_a_running_job_of_its_own_that_nothing_runs(
    engine: JobEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a result that could never be written leaves: the job RUNNING under this server,
    its lease renewed every tick, and no task running it."""
    job = running_job(engine, "tiny", owner=engine.identity, lease=60)
    fail_writes(engine, monkeypatch, times=100)
    outcome = JobOutcome(JobState.FAILED, error="gates failed")
    asyncio.run(engine._run(job, FinishedActor(outcome)))
    assert engine.table.get(job.id).state == JobState.RUNNING
    monkeypatch.undo()
    busy = running_job(engine, "tiny", owner=engine.identity, lease=60)
    engine.pool.busy[busy.id] = FinishedActor(outcome)
    asyncio.run(engine._tick())
    requeued = engine.table.get(job.id)
    assert requeued.state == JobState.QUEUED and requeued.lease_owner == ""
    assert engine.table.get(busy.id).state == JobState.RUNNING
    engine.table.mark_running(job.id, engine.identity, lease_seconds=60)
    asyncio.run(engine._tick())
    failed = engine.table.get(job.id)
    assert failed.state == JobState.FAILED and "2 attempts" in failed.error


class StreamingActor(FinishedActor):
    """A worker actor that streams ``events`` before its outcome, calling ``stall`` after
    the first: what its server lived through meanwhile."""

    def __init__(
        self, outcome: JobOutcome, events: list[dict[str, Any]], stall: Callable[[], None]
    ) -> None:
        super().__init__(outcome)
        self.events = events
        self.stall = stall

    def remote(self, *args: Any) -> AsyncIterator[Any]:
        async def value(item: Any) -> Any:
            return item

        async def refs() -> AsyncIterator[Any]:
            for index, event in enumerate(self.events):
                yield value(event)
                if index == 0:
                    self.stall()
            yield value(self.outcome)

        return refs()


def test_a_stalled_servers_late_events_land_after_no_terminal_event(engine: JobEngine) -> None:
    """The server stalls past its lease; another takes the job over and fails it; the
    stalled server's worker streams on: its late events are dropped."""
    job = running_job(engine, "tiny", owner=engine.identity, lease=60)

    def taken_over() -> None:
        engine.table.claim_abandoned("other", 30, lambda job_id, owner: True)
        engine.table.finish(job.id, JobState.FAILED, message="failed by other", owner="other")

    events = [{"kind": "progress", "message": f"step {i}", "step": i} for i in range(3)]
    outcome = JobOutcome(JobState.FAILED, error="gates failed")
    asyncio.run(engine._run(job, StreamingActor(outcome, events, taken_over)))
    history = engine.table.events_after(job.id, 0)
    assert [e.message for e in history][-2:] == ["step 0", "failed by other"]
    assert history[-1].state is JobState.FAILED


def test_a_full_disk_drops_progress_events_not_the_job(
    engine: JobEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Progress is best effort: SQLite refusing an event for a full disk leaves the job to
    settle with its worker's outcome (it once ended FAILED "internal engine error")."""
    job = running_job(engine, "tiny", owner=engine.identity, lease=60)

    def full(*args: Any, **kwargs: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    def disk_fills() -> None:
        monkeypatch.setattr(engine.table, "add_event", full)

    events = [{"kind": "progress", "message": f"step {i}", "step": i} for i in range(3)]
    outcome = JobOutcome(JobState.CANCELLED, error="cancelled by request")
    asyncio.run(engine._run(job, StreamingActor(outcome, events, disk_fills)))
    monkeypatch.undo()
    settled = engine.table.get(job.id)
    assert settled.state is JobState.CANCELLED, settled.error


def test_a_full_disk_answers_retry_later_not_internal() -> None:
    status = caller_status(sqlite3.OperationalError("database or disk is full"))
    assert status is not None and status[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "out of disk space" in str(status[1])
    assert caller_status(sqlite3.OperationalError("no such table: jobs")) is None


def test_a_job_failed_by_a_full_disk_is_retried_while_attempts_remain(engine: JobEngine) -> None:
    """The disk, not the job, failed: another attempt, then FAILED once attempts run out."""
    job = running_job(engine, "tiny", owner=engine.identity, lease=60)
    full = JobOutcome(JobState.FAILED, error="OSError: no space left", retryable=True)
    asyncio.run(engine._run(job, FinishedActor(full)))
    assert engine.table.get(job.id).state is JobState.QUEUED
    job = engine.table.mark_running(job.id, engine.identity, lease_seconds=60)
    asyncio.run(engine._run(job, FinishedActor(full)))
    failed = engine.table.get(job.id)
    assert failed.state is JobState.FAILED and "no space left" in failed.error


def test_job_starts_and_failures_are_logged_with_the_reason(
    engine: JobEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """Operators see a failed job at WARNING with why (not INFO "job finished")."""
    job = running_job(engine, "tiny", owner=engine.identity, lease=60)
    outcome = JobOutcome(JobState.FAILED, error="gates failed: efficacy=0.5 (needs >= 0.9)")
    with caplog.at_level(logging.INFO, logger="modelsurgery.jobs"):
        asyncio.run(engine._run(job, FinishedActor(outcome)))
    (record,) = [r for r in caplog.records if r.name == "modelsurgery.jobs"]
    assert record.levelno == logging.WARNING and record.job_id == job.id
    assert record.getMessage() == f"job failed: {outcome.error}"
