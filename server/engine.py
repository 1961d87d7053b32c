"""The job engine: dispatches jobs from the durable job table to the Ray worker pool
(``ray_pool``), records their outcomes, and keeps this server's claims (``leases``).

A job whose worker dies is SUCCEEDED if its version was published, else retried while
attempts remain, else failed with the reason; it is never left RUNNING: an end that cannot be
written (disk full) is retried, and the tick settles any RUNNING job of this server that no
task runs. Cancellations reach the owning server through the table, deadlines
(``timeout_s``) end a job as FAILED, and finished jobs older than the retention are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError, WorkerCrashedError

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.proto.job_state import JobState
from modelsurgery.proto.limits import DEFAULT_MAX_JOB_SECONDS, job_deadline_seconds
from modelsurgery.server import job_table as jt
from modelsurgery.server.disk import is_disk_full
from modelsurgery.server.event_throttle import EventThrottle
from modelsurgery.server.executor import WorkerSettings
from modelsurgery.server.leases import (
    may_take_over_early,
    record_published,
    retire_identity,
    server_identity,
    settle_abandoned,
)
from modelsurgery.server.logs import log_job_finished, log_job_started
from modelsurgery.server.metrics import ServerMetrics
from modelsurgery.server.outcome import JobOutcome
from modelsurgery.server.permissions import AliasPolicy, submitter
from modelsurgery.server.ray_pool import WorkerPool, start_ray
from modelsurgery.server.shared_data import report_missing_data

log = logging.getLogger("modelsurgery.engine")
MAX_SETTLE_RETRY_SECONDS = 30.0


@dataclass
class EngineSettings:
    worker: WorkerSettings
    ray_address: str | None = None
    num_cpus: int | None = None
    workers: int = 1
    max_attempts: int = 2
    gpus_per_worker: float = 1.0
    # CPUs each worker asks Ray for (and its torch threads); None: worker_cpus(...) below.
    worker_cpus: int | None = None
    # A RUNNING job's claim lasts this long unless renewed (every tick).
    lease_seconds: float = 30.0
    tick_seconds: float = 2.0
    # A job's deadline when its spec gives no timeout_s; a worker that ignores the cancel is
    # restarted this long after the deadline.
    max_job_seconds: float = DEFAULT_MAX_JOB_SECONDS
    deadline_grace_seconds: float = 60.0
    # Finished jobs (and their events) older than this are deleted; None keeps them.
    retention_seconds: float | None = 30 * 24 * 3600.0
    max_events_per_job: int = 5_000
    # Tries at recording a job's end while SQLite cannot write, the first wait between them
    # (doubling up to MAX_SETTLE_RETRY_SECONDS); then the tick settles the job.
    settle_attempts: int = 8
    settle_retry_seconds: float = 0.5


class JobEngine:
    def __init__(
        self, table: jt.JobTable, settings: EngineSettings, metrics: ServerMetrics
    ) -> None:
        self.table = table
        self.settings = settings
        self.metrics = metrics
        self.pool = WorkerPool()
        self._deadlines: dict[str, tuple[float, float]] = {}
        self._timed_out: set[str] = set()
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self._loop_task: asyncio.Task[None] | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._job_tasks: set[asyncio.Task[None]] = set()
        self._last_retention = float("-inf")
        self._owns_ray = False
        self.identity = server_identity()
        self.store = CheckpointStore(settings.worker.store_root)
        self.alias_policy = AliasPolicy(settings.worker.shared_aliases)

    # --- lifecycle -----------------------------------------------------------------------
    def start_ray(self) -> None:
        # Ray started here is the engine's own (joined clusters and a caller's Ray are not):
        # stop() shuts it down, so an embedded server leaves no Ray behind in its process.
        if start_ray(self.settings.ray_address, self.settings.num_cpus):
            self._owns_ray = True

    async def start(self) -> None:
        await asyncio.to_thread(self.start_ray)
        self.pool.start(
            self.settings.worker,
            self.settings.workers,
            self.settings.worker_cpus,
            self.settings.gpus_per_worker,
        )
        report_missing_data()
        self.recover_abandoned()
        self._loop_task = asyncio.create_task(self._dispatch_loop())
        self._tick_task = asyncio.create_task(self._tick_loop())
        self.wake()

    async def stop(self) -> None:
        """Stop dispatching, end this server's jobs and hand them back to the queue at once
        (the attempt not counted), so a server sharing the home can take them over."""
        for task in (self._loop_task, self._tick_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for task in list(self._job_tasks):
            task.cancel()
        for task in list(self._job_tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.pool.kill_all()
        for job_id in self.table.running_of(self.identity):
            with contextlib.suppress(jt.StateConflict):
                self.table.requeue(
                    job_id,
                    "server stopped; job re-queued",
                    owner=self.identity,
                    count_attempt=False,
                )
        retire_identity(self.identity)
        if self._owns_ray:
            await asyncio.to_thread(ray.shutdown)
            self._owns_ray = False

    # --- leases, recovery, deadlines, retention ------------------------------------------
    def recover_abandoned(self) -> list[jt.JobRecord]:
        """Take over RUNNING jobs whose server is gone and settle each (``leases``)."""
        settled = []
        for job in self.table.claim_abandoned(
            self.identity,
            self.settings.lease_seconds,
            lambda job_id, owner: may_take_over_early(job_id, owner, self.store),
        ):
            settled.append(
                settle_abandoned(
                    job,
                    self.table,
                    self.store,
                    self.identity,
                    self.settings.max_attempts,
                    self.alias_policy,
                )
            )
            log.warning(
                "took over a job of a server that is gone",
                extra={"job_id": job.id, "state": settled[-1].state},
            )
        if settled:
            self.wake()
        return settled

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tick_seconds)
            try:
                await self._tick()
            except Exception:
                log.exception("engine maintenance failed; retrying next tick")

    async def _tick(self) -> None:
        for job_id in self.table.renew_leases(self.identity, self.settings.lease_seconds):
            actor = self.pool.busy.get(job_id)
            if actor is not None:
                actor.cancel.remote(job_id)
        now = time.monotonic()
        for job_id, (deadline, timeout) in list(self._deadlines.items()):
            actor = self.pool.busy.get(job_id)
            if actor is None or now < deadline:
                continue
            if job_id not in self._timed_out:
                self._timed_out.add(job_id)
                log.warning(
                    "job passed its deadline", extra={"job_id": job_id, "timeout_s": timeout}
                )
                actor.cancel.remote(job_id)
            elif now >= deadline + self.settings.deadline_grace_seconds:
                log.error(
                    "job ignored its deadline: restarting its worker", extra={"job_id": job_id}
                )
                ray.kill(actor, no_restart=False)
                self._deadlines.pop(job_id, None)
        self.recover_abandoned()
        if self._settle_orphans():
            self.wake()
        retention = self.settings.retention_seconds
        if retention is not None and now - self._last_retention > 3600:
            self._last_retention = now
            deleted = self.table.delete_finished(time.time() - retention)
            if deleted:
                log.info("deleted finished jobs past retention", extra={"jobs": deleted})

    # --- notifications -------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    async def notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for_change(self, timeout: float) -> None:
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    # --- dispatch ------------------------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        while True:
            actor = await self.pool.idle.get()
            job = self.table.next_queued()
            while job is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                job = self.table.next_queued()
            try:
                job = self.table.mark_running(job.id, self.identity, self.settings.lease_seconds)
            except jt.StateConflict:
                self.pool.idle.put_nowait(actor)
                continue
            self.pool.busy[job.id] = actor  # before any await: the tick sweeps jobs not busy
            log_job_started(job.id, job.attempts, job.base_version)
            await self.notify()
            task = asyncio.create_task(self._run(job, actor))
            self._job_tasks.add(task)
            task.add_done_callback(self._job_tasks.discard)

    def _deadline(self, job: jt.JobRecord) -> float:
        return job_deadline_seconds(
            float(job.spec.get("timeout_s") or 0), self.settings.max_job_seconds
        )

    async def _run(self, job: jt.JobRecord, actor: Any) -> None:
        """Run ``job`` (marked busy on ``actor`` by the dispatcher) and record how it ended."""
        started = time.monotonic()
        timeout = self._deadline(job)
        self._deadlines[job.id] = (started + timeout, timeout)
        throttle = EventThrottle(
            cap=max(0, self.settings.max_events_per_job - self.table.event_count(job.id))
        )
        outcome: JobOutcome | None = None
        worker_died = False
        settle: Callable[[], None]
        try:
            try:
                if self.table.get(job.id).cancel_requested:
                    actor.cancel.remote(job.id)
                base_version = job.base_version or None
                caller = submitter(job.caller, job.caller_role)
                async for ref in actor.run_job.remote(job.id, job.spec, caller, base_version):
                    event = await ref
                    if isinstance(event, JobOutcome):
                        outcome = event
                        break
                    await self._store_events(job.id, throttle.offer(event, time.monotonic()))
                await self._store_events(job.id, throttle.flush())
            except (RayActorError, WorkerCrashedError) as exc:
                worker_died = True
                settle = functools.partial(self._handle_worker_death, job, exc)
            except Exception:
                log.exception("job failed in the engine", extra={"job_id": job.id})
                settle = functools.partial(
                    self._finish,
                    job.id,
                    JobState.FAILED,
                    message="engine error",
                    error="internal engine error",
                )
            else:
                settle = functools.partial(self._record_outcome, job, outcome, timeout)
            await self._settle(job.id, settle)
        finally:
            self.pool.busy.pop(job.id, None)
            self._deadlines.pop(job.id, None)
            self._timed_out.discard(job.id)
            self.metrics.job_finished(time.monotonic() - started)
            if worker_died:
                await self.pool.await_restart(actor)
            self.pool.idle.put_nowait(actor)
            self.wake()
            await self.notify()

    async def _settle(self, job_id: str, settle: Callable[[], None]) -> None:
        """Record how a job ended, retrying with back-off while SQLite cannot write (disk
        full, I/O error): a lost write would leave the job RUNNING under a lease this server
        renews for ever. After the last try the job is an orphan that ``_settle_orphans``
        settles once the table can be written again."""
        delay = self.settings.settle_retry_seconds
        for attempt in range(1, self.settings.settle_attempts + 1):
            try:
                settle()
                return
            except sqlite3.OperationalError as exc:
                log.error(
                    "could not record the end of a job",
                    extra={"job_id": job_id, "attempt": attempt, "why": str(exc)},
                )
            if attempt < self.settings.settle_attempts:
                await asyncio.sleep(delay)
                delay = min(2 * delay, MAX_SETTLE_RETRY_SECONDS)

    def _settle_orphans(self) -> list[jt.JobRecord]:
        """Settle this server's RUNNING jobs that no task runs (their end could not be
        recorded): SUCCEEDED if published, else cancelled, re-queued or failed."""
        return [
            settle_abandoned(
                self.table.get(job_id),
                self.table,
                self.store,
                self.identity,
                self.settings.max_attempts,
                self.alias_policy,
                reason="the job's end could not be recorded",
            )
            for job_id in self.table.running_of(self.identity)
            if job_id not in self.pool.busy
        ]

    async def _store_events(self, job_id: str, events: list[dict[str, Any]]) -> None:
        """Store this server's job's events; the rest of a batch is dropped once the table
        refuses one (the job ended, or another server took it while this one stalled)."""
        stored = False
        for event in events:
            message = str(event.pop("message", event.get("kind", "progress")))
            kind = str(event.pop("kind", "progress"))
            try:
                added = self.table.add_event(job_id, kind, message, event, owner=self.identity)
            except sqlite3.OperationalError as exc:
                if not is_disk_full(exc):
                    raise
                # Progress is best effort: a full disk drops it, not the job (its end is
                # written with retries, ``_settle``).
                log.warning("disk full: progress events dropped", extra={"job_id": job_id})
                break
            if added is None:
                break
            stored = True
        if stored:
            await self.notify()

    def _finish(self, job_id: str, state: JobState, **fields: Any) -> None:
        """Record a result of this server's job, unless another server took it over."""
        try:
            self.table.finish(job_id, state, owner=self.identity, **fields)
        except jt.LeaseLost as exc:
            log.warning("result dropped: job taken over", extra={"job_id": job_id, "why": str(exc)})

    def _record_outcome(
        self, job: jt.JobRecord, outcome: JobOutcome | None, timeout: float
    ) -> None:
        if outcome is None:
            self._finish(job.id, JobState.FAILED, message="worker ended", error="no outcome")
            return
        state, error = outcome.state, outcome.error
        current = self.table.get(job.id)
        retry = outcome.retryable and not current.cancel_requested
        if retry and current.attempts < self.settings.max_attempts:
            with contextlib.suppress(jt.LeaseLost):
                self.table.requeue(job.id, f"{error}; retrying", owner=self.identity)
            return
        if job.id in self._timed_out and state == JobState.CANCELLED:
            state = JobState.FAILED
            error = f"deadline exceeded: the job ran longer than timeout_s={timeout:g} s"
        message = {
            JobState.SUCCEEDED: f"version {outcome.version_id} published",
            JobState.CANCELLED: "cancelled; nothing published",
        }.get(state, "job failed")
        self._finish(job.id, state, message=message, **{**outcome.row_fields(), "error": error})
        log_job_finished(job.id, state, error, outcome.version_id)

    def _handle_worker_death(self, job: jt.JobRecord, exc: Exception) -> None:
        """A worker that died after publishing leaves a version that names the job: the job
        SUCCEEDED with it (the publish is the commit point), as on a takeover. Otherwise the
        job is retried, cancelled, timed out or failed."""
        current = self.table.get(job.id)
        reason = f"worker process died: {type(exc).__name__}"
        log.error("worker died during a job", extra={"job_id": job.id})
        published = self.store.version_of_job(job.id)
        if published is not None:
            try:
                record_published(
                    current,
                    published,
                    self.table,
                    self.store,
                    self.identity,
                    self.alias_policy,
                    f"{reason}; version {published.id} published",
                )
            except jt.LeaseLost as lost:
                log.warning(
                    "result dropped: job taken over", extra={"job_id": job.id, "why": str(lost)}
                )
        elif job.id in self._timed_out:
            timeout = self._deadlines.get(job.id, (0.0, self._deadline(job)))[1]
            self._finish(
                job.id,
                JobState.FAILED,
                message="deadline exceeded; worker restarted",
                error=f"deadline exceeded: the job ran longer than timeout_s={timeout:g} s",
            )
        elif current.cancel_requested:
            self._finish(job.id, JobState.CANCELLED, message=f"{reason}; cancelled")
        elif current.attempts < self.settings.max_attempts:
            with contextlib.suppress(jt.LeaseLost):
                self.table.requeue(job.id, f"{reason}; retrying", owner=self.identity)
        else:
            self._finish(
                job.id,
                JobState.FAILED,
                message=reason,
                error=f"{reason} ({current.attempts} attempts)",
            )

    # --- requests from servicers ---------------------------------------------------------
    async def cancel(self, job_id: str) -> jt.JobRecord:
        job = self.table.request_cancel(job_id)
        actor = self.pool.busy.get(job_id)
        if actor is not None:
            actor.cancel.remote(job_id)
        await self.notify()
        return job

    def import_reference(self, reference: str) -> str | None:
        """Import a model reference on a worker, from a thread (admission): the root
        version's id; the worker keeps the model warm for the job that follows. None on a
        server without workers (``--workers 0``): the server that runs the job imports it."""
        if not self.pool.actors:
            return None
        return ray.get(self.pool.any_actor().import_model.remote(reference))

    async def call(self, method: str, *args: Any) -> Any:
        return await self.pool.call(method, *args)

    async def worker_info(self) -> list[dict[str, Any]]:
        return await self.pool.info()
