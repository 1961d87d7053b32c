"""The durable job table: idempotency and re-runs, transitions, events, recovery after a
restart, migration of an older database."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from modelsurgery.proto.job_state import JobState
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
    assert job.state is JobState.QUEUED
    assert [e.message for e in table.events_after(job.id, 0)] == ["job queued"]
    table.mark_running(job.id)
    with pytest.raises(jt.StateConflict):
        table.mark_running(job.id)
    table.add_event(job.id, "progress", "step", {"step": 1})
    done = table.finish(
        job.id, JobState.SUCCEEDED, message="ok", version_id="v1", metrics={"m": 1.0}
    )
    assert (done.state, done.version_id, done.metrics, done.attempts) == (
        JobState.SUCCEEDED,
        "v1",
        {"m": 1.0},
        1,
    )
    events = table.events_after(job.id, 0)
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert [e.state for e in events] == [
        JobState.QUEUED,
        JobState.RUNNING,
        JobState.RUNNING,
        JobState.SUCCEEDED,
    ]
    assert table.events_after(job.id, 2)[0].seq == 3
    assert table.finish(job.id, JobState.FAILED, message="late").state == JobState.SUCCEEDED


def test_cancel(table: jt.JobTable) -> None:
    queued = submit(table)
    assert table.request_cancel(queued.id).state == JobState.CANCELLED
    with pytest.raises(jt.StateConflict):
        table.request_cancel(queued.id)
    running = submit(table)
    table.mark_running(running.id)
    flagged = table.request_cancel(running.id)
    assert flagged.state == JobState.RUNNING and flagged.cancel_requested
    assert table.next_queued() is None


def test_claim_takes_over_only_jobs_whose_server_is_gone(table: jt.JobTable) -> None:
    live, expired, dead = (submit(table) for _ in range(3))
    table.mark_running(live.id, "host:1:live", lease_seconds=60)
    table.mark_running(expired.id, "host:2:slow", lease_seconds=-1)
    table.mark_running(dead.id, "host:3:dead", lease_seconds=60)
    claimed = table.claim_abandoned("host:9:me", 30, lambda job_id, owner: owner.endswith(":dead"))
    assert sorted(j.id for j in claimed) == sorted([expired.id, dead.id])
    assert {j.lease_owner for j in claimed} == {"host:9:me"}
    assert table.get(live.id).lease_owner == "host:1:live"
    assert table.claim_abandoned("host:8:other", 30, lambda job_id, owner: False) == []


def test_a_server_that_lost_its_lease_cannot_record_a_result(table: jt.JobTable) -> None:
    job = submit(table)
    table.mark_running(job.id, "a", lease_seconds=-1)
    table.claim_abandoned("b", 30, lambda job_id, owner: False)
    with pytest.raises(jt.LeaseLost):
        table.finish(job.id, JobState.SUCCEEDED, message="late", version_id="v1", owner="a")
    with pytest.raises(jt.LeaseLost):
        table.requeue(job.id, "retry", owner="a")
    assert (
        table.finish(job.id, JobState.FAILED, message="b decides", owner="b").state
        == JobState.FAILED
    )


def test_renewal_extends_the_lease_and_reports_cancellations(table: jt.JobTable) -> None:
    job = submit(table)
    table.mark_running(job.id, "a", lease_seconds=1)
    before = table.get(job.id).lease_expires
    assert table.renew_leases("a", 60) == []
    assert table.get(job.id).lease_expires > before + 30
    table.request_cancel(job.id)
    assert table.renew_leases("a", 60) == [job.id]
    assert table.renew_leases("b", 60) == []


def test_requeue_on_stop_gives_the_attempt_back(table: jt.JobTable) -> None:
    job = submit(table)
    table.mark_running(job.id, "a", lease_seconds=30)
    assert table.running_of("a") == [job.id]
    queued = table.requeue(job.id, "server stopped", owner="a", count_attempt=False)
    assert (queued.state, queued.attempts, queued.lease_owner) == (JobState.QUEUED, 0, "")
    assert table.running_of("a") == []


def test_retention_deletes_old_finished_jobs_with_their_events(table: jt.JobTable) -> None:
    old, running = submit(table), submit(table)
    table.mark_running(old.id)
    table.finish(old.id, JobState.SUCCEEDED, message="ok")
    table.mark_running(running.id)
    assert table.delete_finished(before=0) == 0
    assert table.delete_finished(before=time.time() + 1) == 1
    with pytest.raises(KeyError):
        table.get(old.id)
    assert table.events_after(old.id, 0) == []
    assert table.state_of(running.id) is JobState.RUNNING
    assert table.event_count(running.id) == 2


def test_list_filters_and_pages(table: jt.JobTable) -> None:
    jobs = [submit(table) for _ in range(5)]
    table.mark_running(jobs[0].id)
    assert [j.id for j in table.list(states=(JobState.QUEUED,), limit=2)] == [
        jobs[1].id,
        jobs[2].id,
    ]
    assert [j.id for j in table.list(limit=2, offset=4)] == [jobs[4].id]
    assert table.count_by_state()[JobState.QUEUED] == 4
    assert table.queued_count("alice") == 5


@pytest.mark.parametrize("ending", [JobState.FAILED, JobState.CANCELLED])
def test_request_id_reruns_a_failed_or_cancelled_job(table: jt.JobTable, ending: str) -> None:
    first = submit(table, "ci-run")
    if ending == JobState.CANCELLED:
        table.request_cancel(first.id)
    else:
        table.mark_running(first.id)
        table.finish(first.id, JobState.FAILED, message="gates failed", error="gate")
    second, created = table.submit(
        request_id="ci-run", caller="alice", spec={"base": "x"}, fingerprint="f1"
    )
    assert created and second.id != first.id
    assert (second.state, second.request_id, second.previous_attempt) == (
        JobState.QUEUED,
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
    table.finish(job.id, JobState.SUCCEEDED, message="ok", version_id="v1")
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
    assert rerun.previous_attempt == "job-old" and table.get("job-old").state == JobState.FAILED
    table.close()


def test_no_event_is_appended_after_the_terminal_one(table: jt.JobTable) -> None:
    """A server that stalled past its lease, whose job another server ended meanwhile, keeps
    streaming its worker's events: the terminal event stays the last."""
    job = submit(table)
    table.mark_running(job.id, "a", lease_seconds=60)
    assert table.add_event(job.id, "progress", "step 1") is not None
    table.finish(job.id, JobState.FAILED, message="failed", error="boom")
    assert table.add_event(job.id, "progress", "late", {"step": 2}) is None
    events = table.events_after(job.id, 0)
    assert [e.message for e in events] == ["job queued", "attempt 1", "step 1", "failed"]
    assert events[-1].kind == "state" and events[-1].state is JobState.FAILED


def test_a_server_that_lost_its_lease_appends_no_event(table: jt.JobTable) -> None:
    """Its events belong to no attempt: not to the one another server now runs."""
    job = submit(table)
    table.mark_running(job.id, "a", lease_seconds=-1)
    assert table.add_event(job.id, "progress", "step 1", owner="a") is not None
    table.claim_abandoned("b", 30, lambda job_id, owner: False)
    assert table.add_event(job.id, "progress", "stale", owner="a") is None
    assert table.add_event(job.id, "progress", "step 2", owner="b") is not None
    table.requeue(job.id, "retry", owner="b")
    assert table.add_event(job.id, "progress", "stale", owner="b") is None
    messages = [e.message for e in table.events_after(job.id, 0)]
    assert messages == ["job queued", "attempt 1", "step 1", "step 2", "retry"]
