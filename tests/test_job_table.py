"""The durable job table: idempotency and re-runs, transitions, events, recovery after a
restart, migration of an older database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from modelsurgery.server import job_table as jt


@pytest.fixture
def table(tmp_path: Path) -> jt.JobTable:
    t = jt.JobTable(tmp_path / "jobs.sqlite3")
    yield t
    t.close()


def submit(table: jt.JobTable, request_id: str = "", fingerprint: str = "f1") -> jt.JobRecord:
    job, _ = table.submit(
        request_id=request_id, caller="alice", spec={"base": "x"}, fingerprint=fingerprint
    )
    return job


def test_submit_is_idempotent_per_request_id(table: jt.JobTable) -> None:
    job, created = table.submit(request_id="r1", caller="alice", spec={}, fingerprint="f")
    again, created_again = table.submit(request_id="r1", caller="alice", spec={}, fingerprint="f")
    assert created and not created_again and again.id == job.id
    with pytest.raises(jt.IdempotencyConflict):
        table.submit(request_id="r1", caller="alice", spec={}, fingerprint="other")
    other, created_other = table.submit(request_id="r1", caller="bob", spec={}, fingerprint="g")
    assert created_other and other.id != job.id


def test_lifecycle_and_events(table: jt.JobTable) -> None:
    job = submit(table)
    assert job.state == jt.QUEUED
    assert [e.message for e in table.events_after(job.id, 0)] == ["job queued"]
    table.mark_running(job.id)
    with pytest.raises(jt.StateConflict):
        table.mark_running(job.id)
    table.add_event(job.id, "progress", "step", {"step": 1})
    done = table.finish(job.id, jt.SUCCEEDED, message="ok", version_id="v1", metrics={"m": 1.0})
    assert (done.state, done.version_id, done.metrics, done.attempts) == (
        jt.SUCCEEDED,
        "v1",
        {"m": 1.0},
        1,
    )
    events = table.events_after(job.id, 0)
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert [e.state for e in events] == [jt.QUEUED, jt.RUNNING, jt.RUNNING, jt.SUCCEEDED]
    assert table.events_after(job.id, 2)[0].seq == 3
    assert table.finish(job.id, jt.FAILED, message="late").state == jt.SUCCEEDED


def test_cancel(table: jt.JobTable) -> None:
    queued = submit(table)
    assert table.request_cancel(queued.id).state == jt.CANCELLED
    with pytest.raises(jt.StateConflict):
        table.request_cancel(queued.id)
    running = submit(table)
    table.mark_running(running.id)
    flagged = table.request_cancel(running.id)
    assert flagged.state == jt.RUNNING and flagged.cancel_requested
    assert table.next_queued() is None


def test_recovery_requeues_then_fails(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    table = jt.JobTable(path)
    job = submit(table)
    table.mark_running(job.id)
    table.close()
    table = jt.JobTable(path)
    (recovered,) = table.recover_after_restart(max_attempts=2)
    assert recovered.state == jt.QUEUED
    table.mark_running(job.id)
    (failed,) = table.recover_after_restart(max_attempts=2)
    assert failed.state == jt.FAILED and "restarted" in failed.error
    table.close()


def test_list_filters_and_pages(table: jt.JobTable) -> None:
    jobs = [submit(table) for _ in range(5)]
    table.mark_running(jobs[0].id)
    assert [j.id for j in table.list(states=(jt.QUEUED,), limit=2)] == [jobs[1].id, jobs[2].id]
    assert [j.id for j in table.list(limit=2, offset=4)] == [jobs[4].id]
    assert table.count_by_state()[jt.QUEUED] == 4
    assert table.queued_count("alice") == 5


@pytest.mark.parametrize("ending", [jt.FAILED, jt.CANCELLED])
def test_request_id_reruns_a_failed_or_cancelled_job(table: jt.JobTable, ending: str) -> None:
    first = submit(table, "ci-run")
    if ending == jt.CANCELLED:
        table.request_cancel(first.id)
    else:
        table.mark_running(first.id)
        table.finish(first.id, jt.FAILED, message="gates failed", error="gate")
    second, created = table.submit(
        request_id="ci-run", caller="alice", spec={"base": "x"}, fingerprint="f1"
    )
    assert created and second.id != first.id
    assert (second.state, second.request_id, second.previous_attempt) == (
        jt.QUEUED,
        "ci-run",
        first.id,
    )
    assert table.events_after(second.id, 0)[0].message == f"job queued (re-runs {first.id})"
    kept = table.get(first.id)
    assert (kept.state, kept.request_id, kept.previous_attempt) == (ending, first.id, "")
    assert submit(table, "ci-run").id == second.id
    with pytest.raises(jt.IdempotencyConflict):
        submit(table, "ci-run", fingerprint="another spec")


def test_request_id_reuses_a_queued_running_or_succeeded_job(table: jt.JobTable) -> None:
    job = submit(table, "ci-run")
    assert submit(table, "ci-run").id == job.id
    table.mark_running(job.id)
    assert submit(table, "ci-run").id == job.id
    table.finish(job.id, jt.SUCCEEDED, message="ok", version_id="v1")
    again, created = table.submit(
        request_id="ci-run", caller="alice", spec={"base": "x"}, fingerprint="f1"
    )
    assert not created and again.id == job.id and again.previous_attempt == ""


def test_reruns_chain_and_the_request_id_names_the_newest(table: jt.JobTable) -> None:
    attempts = []
    for _ in range(3):
        job = submit(table, "ci-run")
        attempts.append(job)
        table.request_cancel(job.id)
    assert [a.previous_attempt for a in attempts] == ["", attempts[0].id, attempts[1].id]
    keys = [table.get(a.id).request_id for a in attempts]
    assert keys == [attempts[0].id, attempts[1].id, "ci-run"]
    assert len(table.list()) == 3


def test_database_without_previous_attempt_column_is_migrated(tmp_path: Path) -> None:
    """A job table written before ``previous_attempt`` existed opens, keeps its jobs, and
    re-runs one of them."""
    path = tmp_path / "jobs.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(jt._SCHEMA)
    db.execute(
        "INSERT INTO jobs (id, request_id, caller, spec_json, spec_fingerprint, state, created)"
        " VALUES ('job-old', 'ci-run', 'alice', '{}', 'f1', 'FAILED', 1.0)"
    )
    db.commit()
    db.close()
    for _ in range(2):
        table = jt.JobTable(path)
        assert table.get("job-old").previous_attempt == ""
        table.close()
    table = jt.JobTable(path)
    rerun = submit(table, "ci-run")
    assert rerun.previous_attempt == "job-old" and table.get("job-old").state == jt.FAILED
    table.close()
