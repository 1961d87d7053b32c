"""The durable job table: jobs and their append-only events in SQLite (WAL, synchronous=FULL).

A job and its first event are inserted in one transaction, so a job is never visible without
its history, and a crash leaves either both or neither.

A request id names one attempt at a time: submitting it again returns that job while it is
queued, running or succeeded, and starts a new attempt (``previous_attempt`` naming the old one)
once it failed or was cancelled, so a CI re-run does real work instead of replaying a failure.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from modelsurgery.proto.job_state import RERUN_STATES, TERMINAL_STATES, JobState

# The old names, while the engine and the job service still import them from here.

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    caller TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    spec_fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    version_id TEXT,
    metrics_json TEXT NOT NULL DEFAULT '{}',
    gates_json TEXT NOT NULL DEFAULT '[]',
    error TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    UNIQUE (caller, request_id)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, created);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    seq INTEGER NOT NULL,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    message TEXT NOT NULL,
    fields_json TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (job_id, seq)
);
-- Who made each version a job published (kept past the jobs' retention): they, and admins,
-- see the data the version's operations carried inline (``may_see_version_data``).
CREATE TABLE IF NOT EXISTS version_creators (
    version_id TEXT NOT NULL,
    caller TEXT NOT NULL,
    PRIMARY KEY (version_id, caller)
);
"""
# Columns added since the first schema. CREATE TABLE IF NOT EXISTS leaves an existing table as
# it was, so each one is added with ALTER TABLE where a database lacks it (old and new databases
# end up with the same columns in the same order).
_ADDED_COLUMNS = (
    ("previous_attempt", "TEXT NOT NULL DEFAULT ''"),
    # The server running the job and until when its claim holds (see ``renew_leases``).
    ("lease_owner", "TEXT NOT NULL DEFAULT ''"),
    ("lease_expires", "REAL NOT NULL DEFAULT 0"),
    # The version admission pinned the spec's base to; the worker runs on it ('' in rows
    # admitted before bases were pinned: the worker resolves the spec's base).
    ("base_version", "TEXT NOT NULL DEFAULT ''"),
    # The submitter's role at submit: what may its job do when it publishes (move an alias).
    ("caller_role", "TEXT NOT NULL DEFAULT ''"),
)


class IdempotencyConflict(ValueError):
    """A request_id was reused with a different spec."""


class StateConflict(RuntimeError):
    """The job's state forbids the transition (e.g. cancelling a finished job)."""


class LeaseLost(StateConflict):
    """Another server took the job over (this one's lease expired): its result is not ours."""


@dataclass
class JobRecord:
    id: str
    request_id: str
    caller: str
    spec: dict[str, Any]
    spec_fingerprint: str
    state: JobState
    created: float
    started: float | None = None
    finished: float | None = None
    version_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    gates: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    attempts: int = 0
    cancel_requested: bool = False
    previous_attempt: str = ""
    lease_owner: str = ""
    lease_expires: float = 0.0
    base_version: str = ""
    caller_role: str = ""


@dataclass
class EventRecord:
    job_id: str
    seq: int
    time: float
    kind: str
    state: JobState
    message: str
    fields: dict[str, Any]


# Columns stored as JSON, and the record field each one fills.
_JSON_COLUMNS = {"spec_json": "spec", "metrics_json": "metrics", "gates_json": "gates"}


def _job_from_row(row: sqlite3.Row) -> JobRecord:
    """Every column is a field of the same name (JSON columns decoded into theirs)."""
    values = {
        _JSON_COLUMNS.get(name, name): json.loads(row[name]) if name in _JSON_COLUMNS else row[name]
        for name in row.keys()  # noqa: SIM118 (sqlite3.Row iterates values)
    }
    values.update(state=JobState(row["state"]), cancel_requested=bool(row["cancel_requested"]))
    return JobRecord(**values)


class JobTable:
    """Thread-safe access to the job database; every write is one durable transaction."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        # Processes opening one home at once (parallel `apply --local`) set it up in turn: a
        # journal-mode change racing another process's set-up failed with "database is locked".
        with FileLock(str(path.with_name(path.name + ".setup.lock"))):
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        with self._transaction():
            present = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
            for name, definition in _ADDED_COLUMNS:
                if name not in present:
                    self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db, self._lock)

    def _append_event(
        self, job_id: str, kind: str, state: JobState, message: str, fields: dict[str, Any]
    ) -> EventRecord:
        row = self._db.execute(
            "SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = ?", (job_id,)
        ).fetchone()
        event = EventRecord(job_id, row[0] + 1, time.time(), kind, state, message, fields)
        self._db.execute(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                event.job_id,
                event.seq,
                event.time,
                kind,
                state,
                message,
                json.dumps(fields, default=str),
            ),
        )
        return event

    # --- jobs ----------------------------------------------------------------------------
    def submit(
        self,
        *,
        request_id: str,
        caller: str,
        spec: dict[str, Any],
        fingerprint: str,
        base_version: str = "",
        caller_role: str = "",
    ) -> tuple[JobRecord, bool]:
        """Insert a QUEUED job (on the pinned ``base_version``, submitted by ``caller`` with
        ``caller_role``) with its first event, or return the job this request made.

        (caller, request_id) stays unique and names the newest attempt: a FAILED or CANCELLED
        job gives the request id up (its key becomes its own id, as for a job submitted without
        one) to the new attempt, whose ``previous_attempt`` names it.
        """
        previous = ""
        with self._transaction():
            if request_id:
                row = self._db.execute(
                    "SELECT * FROM jobs WHERE caller = ? AND request_id = ?",
                    (caller, request_id),
                ).fetchone()
                if row is not None:
                    existing = _job_from_row(row)
                    if existing.spec_fingerprint != fingerprint:
                        raise IdempotencyConflict(
                            f"request_id {request_id!r} was already used with another spec "
                            f"(job {existing.id})"
                        )
                    if existing.state not in RERUN_STATES:
                        return existing, False
                    previous = existing.id
                    self._db.execute("UPDATE jobs SET request_id = id WHERE id = ?", (existing.id,))
            job_id = "job-" + uuid.uuid4().hex[:16]
            request_id = request_id or job_id
            state, now = JobState.QUEUED, time.time()
            self._db.execute(
                "INSERT INTO jobs (id, request_id, caller, spec_json, spec_fingerprint, state,"
                " created, previous_attempt, base_version, caller_role)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    request_id,
                    caller,
                    # Compact UTF-8, as the spec bounds measure it.
                    json.dumps(spec, separators=(",", ":"), ensure_ascii=False),
                    fingerprint,
                    state,
                    now,
                    previous,
                    base_version,
                    caller_role,
                ),
            )
            message = f"job queued (re-runs {previous})" if previous else "job queued"
            self._append_event(job_id, "state", state, message, {})
        return self.get(job_id), True

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return _job_from_row(row)

    def list(
        self,
        *,
        states: tuple[JobState, ...] = (),
        limit: int = 100,
        offset: int = 0,
        caller: str | None = None,
    ) -> list[JobRecord]:
        """Jobs in submit order; only ``caller``'s when given (None: every caller's)."""
        conditions: list[str] = []
        params: list[Any] = []
        if states:
            conditions.append(f"state IN ({','.join('?' * len(states))})")
            params.extend(states)
        if caller is not None:
            conditions.append("caller = ?")
            params.append(caller)
        query = "SELECT * FROM jobs"
        if conditions:
            query += " WHERE " + " AND ".join(conditions)
        query += " ORDER BY created, id LIMIT ? OFFSET ?"
        params.extend([limit, offset])
        with self._lock:
            rows = self._db.execute(query, params).fetchall()
        return [_job_from_row(r) for r in rows]

    def count_by_state(self) -> dict[JobState, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return dict.fromkeys(JobState, 0) | {JobState(state): n for state, n in rows}

    def queued_count(self, caller: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE caller = ? AND state IN (?, ?)",
                (caller, JobState.QUEUED, JobState.RUNNING),
            ).fetchone()
        return int(row[0])

    def next_queued(self) -> JobRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE state = ? AND cancel_requested = 0 "
                "ORDER BY created, id LIMIT 1",
                (JobState.QUEUED,),
            ).fetchone()
        return None if row is None else _job_from_row(row)

    def mark_running(self, job_id: str, owner: str = "", lease_seconds: float = 0.0) -> JobRecord:
        """QUEUED -> RUNNING under ``owner``'s lease; the state check and the claim are one
        transaction, so of two servers sharing the database only one gets the job."""
        with self._transaction():
            job = self.get(job_id)
            if job.state is not JobState.QUEUED:
                raise StateConflict(f"job {job_id} is {job.state}, not {JobState.QUEUED}")
            now = time.time()
            self._db.execute(
                "UPDATE jobs SET state = ?, started = ?, attempts = attempts + 1,"
                " lease_owner = ?, lease_expires = ? WHERE id = ?",
                (JobState.RUNNING, now, owner, now + lease_seconds, job_id),
            )
            self._append_event(job_id, "state", JobState.RUNNING, f"attempt {job.attempts + 1}", {})
        return self.get(job_id)

    def _check_owner(self, job: JobRecord, owner: str | None) -> None:
        if owner is not None and job.state is JobState.RUNNING and job.lease_owner != owner:
            raise LeaseLost(f"job {job.id} is now run by {job.lease_owner or 'another server'}")

    def finish(
        self,
        job_id: str,
        state: JobState | str,
        *,
        message: str,
        version_id: str | None = None,
        metrics: dict[str, float] | None = None,
        gates: list[dict[str, Any]] | None = None,
        error: str = "",
        owner: str | None = None,
    ) -> JobRecord:
        """Move a job to a terminal state with its results; a no-op if it already ended.
        With ``owner``, a RUNNING job must still be that server's (else ``LeaseLost``)."""
        state = JobState(state)
        if not state.is_terminal:
            raise ValueError(f"{state} is not a terminal state")
        with self._transaction():
            job = self.get(job_id)
            if job.state.is_terminal:
                return job
            self._check_owner(job, owner)
            self._db.execute(
                "UPDATE jobs SET state = ?, finished = ?, version_id = ?, metrics_json = ?,"
                " gates_json = ?, error = ? WHERE id = ?",
                (
                    state,
                    time.time(),
                    version_id,
                    json.dumps(metrics or {}),
                    json.dumps(gates or []),
                    error,
                    job_id,
                ),
            )
            if state is JobState.SUCCEEDED and version_id:
                self._db.execute(
                    "INSERT OR IGNORE INTO version_creators VALUES (?, ?)", (version_id, job.caller)
                )
            self._append_event(job_id, "state", state, message, {"error": error} if error else {})
        return self.get(job_id)

    def creators(self, version_ids: list[str]) -> dict[str, set[str]]:
        """The callers whose jobs published each of ``version_ids`` (jobs that succeeded
        before creators were recorded count while their rows are kept)."""
        found: dict[str, set[str]] = {v: set() for v in version_ids}
        marks = ",".join("?" * len(version_ids))
        with self._lock:
            rows = self._db.execute(
                f"SELECT version_id, caller FROM version_creators WHERE version_id IN ({marks})"
                f" UNION SELECT version_id, caller FROM jobs WHERE state = ?"
                f" AND version_id IN ({marks})",
                (*version_ids, JobState.SUCCEEDED, *version_ids),
            ).fetchall()
        for version_id, caller in rows:
            found[version_id].add(caller)
        return found

    def requeue(
        self, job_id: str, reason: str, *, owner: str | None = None, count_attempt: bool = True
    ) -> JobRecord:
        """RUNNING -> QUEUED; ``count_attempt=False`` gives the attempt back (the server
        stopped, the job did not fail)."""
        with self._transaction():
            self._check_owner(self.get(job_id), owner)
            self._db.execute(
                "UPDATE jobs SET state = ?, started = NULL, lease_owner = '', lease_expires = 0,"
                " attempts = MAX(0, attempts - ?) WHERE id = ?",
                (JobState.QUEUED, 0 if count_attempt else 1, job_id),
            )
            self._append_event(job_id, "state", JobState.QUEUED, reason, {})
        return self.get(job_id)

    # --- leases --------------------------------------------------------------------------
    def renew_leases(self, owner: str, lease_seconds: float) -> list[str]:
        """Extend ``owner``'s claim on its RUNNING jobs; returns those of them whose
        cancellation was requested (possibly through another server sharing the database)."""
        with self._transaction():
            self._db.execute(
                "UPDATE jobs SET lease_expires = ? WHERE lease_owner = ? AND state = ?",
                (time.time() + lease_seconds, owner, JobState.RUNNING),
            )
            rows = self._db.execute(
                "SELECT id FROM jobs WHERE lease_owner = ? AND state = ? AND cancel_requested = 1",
                (owner, JobState.RUNNING),
            ).fetchall()
        return [row[0] for row in rows]

    def claim_abandoned(
        self, owner: str, lease_seconds: float, may_take: Callable[[str, str], bool]
    ) -> list[JobRecord]:
        """Take over RUNNING jobs whose server is gone: its lease expired, or
        ``may_take(job_id, lease_owner)`` says the job may be taken before that. The caller
        then decides each one's fate (publish found, re-queue, fail) as their new owner.

        ``may_take`` is asked outside the write transaction (it may read the store); each claim
        is then a compare-and-swap on the lease read, so a lease renewed meanwhile stays."""
        now = time.time()
        with self._lock:
            rows = self._db.execute(
                "SELECT id, lease_owner, lease_expires FROM jobs"
                " WHERE state = ? AND lease_owner != ?",
                (JobState.RUNNING, owner),
            ).fetchall()
        wanted = [
            (r["id"], r["lease_owner"], r["lease_expires"])
            for r in rows
            if r["lease_expires"] < now or may_take(r["id"], r["lease_owner"])
        ]
        taken = []
        with self._transaction():
            for job_id, previous, expires in wanted:
                claimed = self._db.execute(
                    "UPDATE jobs SET lease_owner = ?, lease_expires = ? WHERE id = ? AND state = ?"
                    " AND lease_owner = ? AND lease_expires = ?",
                    (
                        owner,
                        time.time() + lease_seconds,
                        job_id,
                        JobState.RUNNING,
                        previous,
                        expires,
                    ),
                )
                if claimed.rowcount:
                    taken.append(job_id)
        return [self.get(job_id) for job_id in taken]

    def holds(self, job_id: str, owner: str) -> bool:
        """Whether ``job_id`` is RUNNING under ``owner``'s lease (checked before a step that
        only its owner may take, such as moving its alias)."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM jobs WHERE id = ? AND state = ? AND lease_owner = ?",
                (job_id, JobState.RUNNING, owner),
            ).fetchone()
        return row is not None

    def running_of(self, owner: str) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM jobs WHERE lease_owner = ? AND state = ?",
                (owner, JobState.RUNNING),
            ).fetchall()
        return [row[0] for row in rows]

    # --- retention -----------------------------------------------------------------------
    def delete_finished(self, before: float) -> int:
        """Remove jobs that ended before ``before`` (a Unix time) with their events."""
        with self._transaction():
            ids = [
                row[0]
                for row in self._db.execute(
                    f"SELECT id FROM jobs WHERE finished < ? AND state IN ({','.join('?' * 3)})",
                    (before, *sorted(TERMINAL_STATES)),
                )
            ]
            for job_id in ids:
                self._db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
                self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return len(ids)

    def request_cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued job at once; flag a running one (the worker stops between steps)."""
        with self._transaction():
            job = self.get(job_id)
            if job.state.is_terminal:
                raise StateConflict(f"job {job_id} already ended as {job.state}")
            if job.state is JobState.QUEUED:
                self._db.execute(
                    "UPDATE jobs SET state = ?, finished = ?, cancel_requested = 1 WHERE id = ?",
                    (JobState.CANCELLED, time.time(), job_id),
                )
                self._append_event(
                    job_id, "state", JobState.CANCELLED, "cancelled before it started", {}
                )
            else:
                self._db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                self._append_event(job_id, "log", job.state, "cancellation requested", {})
        return self.get(job_id)

    # --- events --------------------------------------------------------------------------
    def add_event(
        self,
        job_id: str,
        kind: str,
        message: str,
        fields: dict[str, Any] | None = None,
        *,
        owner: str | None = None,
    ) -> EventRecord | None:
        """Append a worker's event; None (nothing stored) once the job has ended, so its
        terminal event stays its last, and, with ``owner``, unless the job is RUNNING under
        that server's lease: a server that stalled and lost the job keeps streaming its
        worker's events, which belong to no attempt now. Checked in the write transaction."""
        with self._transaction():
            row = self._db.execute(
                "SELECT state, lease_owner FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if row is None:
                raise KeyError(job_id)
            state = JobState(row["state"])
            if state.is_terminal or (
                owner is not None and (state is not JobState.RUNNING or row["lease_owner"] != owner)
            ):
                return None
            return self._append_event(job_id, kind, state, message, fields or {})

    def state_of(self, job_id: str) -> JobState:
        """The job's state alone (no spec parse: cheap for watchers and event writes)."""
        with self._lock:
            row = self._db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        return JobState(row[0])

    def event_count(self, job_id: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM events WHERE job_id = ?", (job_id,)
            ).fetchone()
        return int(row[0])

    def events_after(self, job_id: str, after_seq: int, limit: int = 500) -> list[EventRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (job_id, after_seq, limit),
            ).fetchall()
        return [
            EventRecord(
                r["job_id"],
                r["seq"],
                r["time"],
                r["kind"],
                JobState(r["state"]),
                r["message"],
                json.loads(r["fields_json"]),
            )
            for r in rows
        ]

    def event_counts_after(self, rowid: int) -> tuple[dict[tuple[str, JobState], int], int]:
        """Counts of the events stored after ``rowid`` by (kind, state), and the last rowid.

        Events are append-only, so a reader keeps running totals by asking only for new rows
        (a range of the rowid b-tree) instead of counting the whole table on every call.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, state, COUNT(*), MAX(rowid) FROM events WHERE rowid > ?"
                " GROUP BY kind, state",
                (rowid,),
            ).fetchall()
        counts = {(kind, JobState(state)): n for kind, state, n, _ in rows}
        return counts, max((last for *_, last in rows), default=rowid)


class _Transaction:
    def __init__(self, db: sqlite3.Connection, lock: threading.RLock) -> None:
        self._db = db
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire()
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._lock.release()
