"""The job engine: a pool of Ray worker actors fed from the durable job table.

Embedded Ray by default (``ray.init(address="local", num_cpus=...)`` in the server process,
dashboard off: a fresh cluster of its own even when ``ray start`` left one on the machine), or an
existing cluster only when ``ray_address`` names one (``--ray-address`` / ``RAY_ADDRESS``).
Each worker asks for CPUs one node can give (``worker_cpus``, by default what the smallest node
has, or less so that all workers fit), workers spread over the nodes, and what they print
reaches the server's log (``log_to_driver``).
A job whose worker dies is retried while attempts remain, else failed with the reason; it is
never left RUNNING.

Several servers may share one home (parallel ``apply --local`` runs, a second ``serve``): the
job table is the queue, a RUNNING job belongs to the server that claimed it (a lease it renews
every ``tick_seconds``), and a server re-queues only jobs whose owner is gone (lease expired, or
its process no longer exists on this host). A job whose version was published before its server
died is recorded SUCCEEDED with that version: the manifest (which names the job) is the commit
point. Cancellations reach the owning server through the table, deadlines (``timeout_s``) end a
job as FAILED, and finished jobs older than the retention are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError, WorkerCrashedError

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.proto.limits import DEFAULT_MAX_JOB_SECONDS, job_deadline_seconds
from modelsurgery.proto.spec import parse_spec
from modelsurgery.server import job_table as jt
from modelsurgery.server.event_throttle import EventThrottle
from modelsurgery.server.executor import WorkerSettings, evaluate_gates
from modelsurgery.server.metrics import ServerMetrics
from modelsurgery.server.shared_data import report_missing_data
from modelsurgery.server.worker import SurgeryWorker

GCS_PORT_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"
GCS_PORT_WAIT_SECONDS = "120"

log = logging.getLogger("modelsurgery.engine")


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


# Identities of the engines alive in this process (tests and embedded servers may run several).
_LIVE_IN_THIS_PROCESS: set[str] = set()


def server_identity() -> str:
    """``host:pid:nonce``: unique per server start, and says where its process lives."""
    identity = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    _LIVE_IN_THIS_PROCESS.add(identity)
    return identity


def owner_is_dead(owner: str) -> bool:
    """Whether the server that claimed a job is known to be gone: no owner (an older
    database), an engine of this process that stopped (or of an earlier process with this
    pid), or a process that no longer exists on this host. Owners on other hosts are judged
    by their lease alone."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if not owner or not pid_text.isdigit():
        return True
    if host != socket.gethostname():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return owner not in _LIVE_IN_THIS_PROCESS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def node_cpus() -> list[int]:
    """CPUs of each alive Ray node that has any (a head started with --num-cpus=0 has none)."""
    cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return [c for c in cpus if c > 0]


def worker_cpus(nodes: list[int], workers: int) -> int:
    """CPUs per worker when not given: the cluster's CPUs shared among the workers, but never
    more than the smallest node has, since an actor's CPUs come from one node (asking for the
    whole cluster's leaves it pending for ever on two or more nodes)."""
    if not nodes:
        return 1
    return max(1, min(min(nodes), sum(nodes) // max(1, workers)))


class JobEngine:
    def __init__(
        self, table: jt.JobTable, settings: EngineSettings, metrics: ServerMetrics
    ) -> None:
        self.table = table
        self.settings = settings
        self.metrics = metrics
        self._actors: list[Any] = []
        self._idle: asyncio.Queue[Any] = asyncio.Queue()
        self._running: dict[str, Any] = {}
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

    # --- lifecycle -----------------------------------------------------------------------
    def start_ray(self) -> None:
        if ray.is_initialized():
            return
        # Ray started here is the engine's own (joined clusters and a caller's Ray are not):
        # stop() shuts it down, so an embedded server leaves no Ray behind in its process.
        self._owns_ray = True
        if self.settings.ray_address:
            ray.init(address=self.settings.ray_address, log_to_driver=True)
        else:
            # Ray waits 30 s for its GCS to publish a port; a loaded CI machine (two cores, a
            # server just stopped beside it) has taken longer. The operator's value wins.
            os.environ.setdefault(GCS_PORT_WAIT_ENV, GCS_PORT_WAIT_SECONDS)
            ray.init(
                address="local",
                num_cpus=self.settings.num_cpus,
                include_dashboard=False,
                log_to_driver=True,
                configure_logging=False,
            )

    async def start(self) -> None:
        await asyncio.to_thread(self.start_ray)
        resources = ray.cluster_resources()
        use_gpu = resources.get("GPU", 0) >= self.settings.gpus_per_worker
        nodes = node_cpus()
        cpus = self.settings.worker_cpus or worker_cpus(nodes, self.settings.workers)
        if nodes and cpus > max(nodes):
            log.warning(
                "no Ray node has the CPUs a worker asks for: workers stay pending",
                extra={"cpus_per_worker": cpus, "largest_node_cpus": max(nodes)},
            )
        actor_class = ray.remote(SurgeryWorker).options(
            num_cpus=cpus,
            num_gpus=self.settings.gpus_per_worker if use_gpu else 0,
            scheduling_strategy="SPREAD",
            max_concurrency=8,
            max_restarts=-1,
            max_task_retries=0,
        )
        for _ in range(self.settings.workers):
            actor = actor_class.remote(self.settings.worker, cpus)
            self._actors.append(actor)
            self._idle.put_nowait(actor)
        log.info(
            "job engine started",
            extra={
                "workers": self.settings.workers,
                "cpus_per_worker": cpus,
                "gpu": use_gpu,
                "nodes": len(nodes),
            },
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
        for actor in self._actors:
            ray.kill(actor)
        self._actors.clear()
        for job_id in self.table.running_of(self.identity):
            with contextlib.suppress(jt.StateConflict):
                self.table.requeue(
                    job_id,
                    "server stopped; job re-queued",
                    owner=self.identity,
                    count_attempt=False,
                )
        _LIVE_IN_THIS_PROCESS.discard(self.identity)
        if self._owns_ray:
            await asyncio.to_thread(ray.shutdown)
            self._owns_ray = False

    # --- leases, recovery, deadlines, retention ------------------------------------------
    def recover_abandoned(self) -> list[jt.JobRecord]:
        """Take over RUNNING jobs whose server is gone and settle each: SUCCEEDED when its
        version was published, else re-queued while attempts remain, else FAILED."""
        settled = []
        for job in self.table.claim_abandoned(
            self.identity, self.settings.lease_seconds, owner_is_dead
        ):
            settled.append(self._settle_abandoned(job))
            log.warning(
                "took over a job of a server that is gone",
                extra={"job_id": job.id, "state": settled[-1].state},
            )
        if settled:
            self.wake()
        return settled

    def _settle_abandoned(self, job: jt.JobRecord) -> jt.JobRecord:
        mine = self.identity
        published = self.store.version_of_job(job.id)
        if published is not None:
            try:
                gates = evaluate_gates(parse_spec(job.spec), dict(published.metrics))
            except ValueError:  # a row stored before today's bounds: its gates held then
                gates = []
            alias = job.spec.get("alias")
            if alias and self.store.get_alias(alias) != published.id:
                self.store.set_alias(alias, published.id, owner=job.caller)
            return self.table.finish(
                job.id,
                jt.SUCCEEDED,
                message=f"version {published.id} published (recorded after a server restart)",
                version_id=published.id,
                metrics=dict(published.metrics),
                gates=gates,
                owner=mine,
            )
        if job.cancel_requested:
            return self.table.finish(
                job.id, jt.CANCELLED, message="cancelled; server restarted", owner=mine
            )
        if job.attempts < self.settings.max_attempts:
            return self.table.requeue(job.id, "server restarted; job re-queued", owner=mine)
        return self.table.finish(
            job.id,
            jt.FAILED,
            message="server restarted",
            error=f"server restarted while the job ran ({job.attempts} attempts)",
            owner=mine,
        )

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tick_seconds)
            try:
                await self._tick()
            except Exception:
                log.exception("engine maintenance failed; retrying next tick")

    async def _tick(self) -> None:
        for job_id in self.table.renew_leases(self.identity, self.settings.lease_seconds):
            actor = self._running.get(job_id)
            if actor is not None:
                actor.cancel.remote(job_id)
        now = time.monotonic()
        for job_id, (deadline, timeout) in list(self._deadlines.items()):
            actor = self._running.get(job_id)
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
            actor = await self._idle.get()
            job = self.table.next_queued()
            while job is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                job = self.table.next_queued()
            try:
                job = self.table.mark_running(job.id, self.identity, self.settings.lease_seconds)
            except jt.StateConflict:
                self._idle.put_nowait(actor)
                continue
            await self.notify()
            task = asyncio.create_task(self._run(job, actor))
            self._job_tasks.add(task)
            task.add_done_callback(self._job_tasks.discard)

    def _deadline(self, job: jt.JobRecord) -> float:
        return job_deadline_seconds(
            float(job.spec.get("timeout_s") or 0), self.settings.max_job_seconds
        )

    async def _run(self, job: jt.JobRecord, actor: Any) -> None:
        self._running[job.id] = actor
        started = time.monotonic()
        timeout = self._deadline(job)
        self._deadlines[job.id] = (started + timeout, timeout)
        throttle = EventThrottle(
            cap=max(0, self.settings.max_events_per_job - self.table.event_count(job.id))
        )
        outcome: dict[str, Any] | None = None
        worker_died = False
        try:
            if self.table.get(job.id).cancel_requested:
                actor.cancel.remote(job.id)
            async for ref in actor.run_job.remote(job.id, job.spec, job.caller):
                event = await ref
                if event.get("kind") == "outcome":
                    outcome = event
                    break
                await self._store_events(job.id, throttle.offer(event, time.monotonic()))
            await self._store_events(job.id, throttle.flush())
        except (RayActorError, WorkerCrashedError) as exc:
            worker_died = True
            self._handle_worker_death(job, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job failed in the engine", extra={"job_id": job.id})
            self._finish(job.id, jt.FAILED, message="engine error", error="internal engine error")
        else:
            self._record_outcome(job, outcome, timeout)
        finally:
            self._running.pop(job.id, None)
            self._deadlines.pop(job.id, None)
            self._timed_out.discard(job.id)
            self.metrics.job_finished(time.monotonic() - started)
            if worker_died:
                await self._await_restart(actor)
            self._idle.put_nowait(actor)
            self.wake()
            await self.notify()

    async def _store_events(self, job_id: str, events: list[dict[str, Any]]) -> None:
        for event in events:
            message = str(event.pop("message", event.get("kind", "progress")))
            kind = str(event.pop("kind", "progress"))
            self.table.add_event(job_id, kind, message, event)
        if events:
            await self.notify()

    def _finish(self, job_id: str, state: str, **fields: Any) -> None:
        """Record a result of this server's job, unless another server took it over."""
        try:
            self.table.finish(job_id, state, owner=self.identity, **fields)
        except jt.LeaseLost as exc:
            log.warning("result dropped: job taken over", extra={"job_id": job_id, "why": str(exc)})

    async def _await_restart(self, actor: Any, timeout: float = 600.0) -> None:
        """Ray restarts a dead actor; hand it new work only once it answers again."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(actor.info.remote(), 30)
                log.info("worker restarted")
                return
            except (RayActorError, WorkerCrashedError, TimeoutError):
                await asyncio.sleep(1.0)
        log.error("worker did not come back after %s s", timeout)

    def _record_outcome(
        self, job: jt.JobRecord, outcome: dict[str, Any] | None, timeout: float
    ) -> None:
        if outcome is None:
            self._finish(job.id, jt.FAILED, message="worker ended", error="no outcome")
            return
        state = outcome.get("state", jt.FAILED)
        error = outcome.get("error", "")
        if job.id in self._timed_out and state == jt.CANCELLED:
            state = jt.FAILED
            error = f"deadline exceeded: the job ran longer than timeout_s={timeout:g} s"
        message = {
            jt.SUCCEEDED: f"version {outcome.get('version_id')} published",
            jt.CANCELLED: "cancelled; nothing published",
        }.get(state, "job failed")
        self._finish(
            job.id,
            state,
            message=message,
            version_id=outcome.get("version_id"),
            metrics={k: float(v) for k, v in (outcome.get("metrics") or {}).items()},
            gates=outcome.get("gates") or [],
            error=error,
        )
        log.info("job finished", extra={"job_id": job.id, "state": state})

    def _handle_worker_death(self, job: jt.JobRecord, exc: Exception) -> None:
        current = self.table.get(job.id)
        reason = f"worker process died: {type(exc).__name__}"
        log.error("worker died during a job", extra={"job_id": job.id})
        if job.id in self._timed_out:
            timeout = self._deadlines.get(job.id, (0.0, self._deadline(job)))[1]
            self._finish(
                job.id,
                jt.FAILED,
                message="deadline exceeded; worker restarted",
                error=f"deadline exceeded: the job ran longer than timeout_s={timeout:g} s",
            )
        elif current.cancel_requested:
            self._finish(job.id, jt.CANCELLED, message=f"{reason}; cancelled")
        elif current.attempts < self.settings.max_attempts:
            with contextlib.suppress(jt.LeaseLost):
                self.table.requeue(job.id, f"{reason}; retrying", owner=self.identity)
        else:
            self._finish(
                job.id, jt.FAILED, message=reason, error=f"{reason} ({current.attempts} attempts)"
            )

    # --- requests from servicers ---------------------------------------------------------
    async def cancel(self, job_id: str) -> jt.JobRecord:
        job = self.table.request_cancel(job_id)
        actor = self._running.get(job_id)
        if actor is not None:
            actor.cancel.remote(job_id)
        await self.notify()
        return job

    def any_actor(self) -> Any:
        """A worker for short requests (generation, import); they run beside jobs."""
        if not self._actors:
            raise RuntimeError("job engine is not started")
        return min(self._actors, key=lambda a: a in self._running.values())

    async def call(self, method: str, *args: Any) -> Any:
        return await getattr(self.any_actor(), method).remote(*args)

    async def worker_info(self) -> list[dict[str, Any]]:
        return [await actor.info.remote() for actor in self._actors]
