"""The job engine: a pool of Ray worker actors fed from the durable job table.

Embedded Ray by default (``ray.init(address="local", num_cpus=...)`` in the server process,
dashboard off: a fresh cluster of its own even when ``ray start`` left one on the machine), or an
existing cluster only when ``ray_address`` names one (``--ray-address`` / ``RAY_ADDRESS``).
Each worker asks for CPUs one node can give (``worker_cpus``, by default what the smallest node
has, or less so that all workers fit), workers spread over the nodes, and what they print
reaches the server's log (``log_to_driver``).
A job whose worker dies is retried while attempts remain, else failed with the reason; it is
never left RUNNING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError, WorkerCrashedError

from modelsurgery.server import job_table as jt
from modelsurgery.server.executor import WorkerSettings
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
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self._loop_task: asyncio.Task[None] | None = None
        self._job_tasks: set[asyncio.Task[None]] = set()

    # --- lifecycle -----------------------------------------------------------------------
    def start_ray(self) -> None:
        if ray.is_initialized():
            return
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
        for job in self.table.recover_after_restart(self.settings.max_attempts):
            log.warning("recovered job after restart", extra={"job_id": job.id, "state": job.state})
        self._loop_task = asyncio.create_task(self._dispatch_loop())
        self.wake()

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for task in list(self._job_tasks):
            task.cancel()
        for task in list(self._job_tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for actor in self._actors:
            ray.kill(actor)
        self._actors.clear()

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
                self.metrics.observe_table(self.table)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                job = self.table.next_queued()
            try:
                job = self.table.mark_running(job.id)
            except jt.StateConflict:
                self._idle.put_nowait(actor)
                continue
            await self.notify()
            task = asyncio.create_task(self._run(job, actor))
            self._job_tasks.add(task)
            task.add_done_callback(self._job_tasks.discard)

    async def _run(self, job: jt.JobRecord, actor: Any) -> None:
        self._running[job.id] = actor
        started = time.monotonic()
        outcome: dict[str, Any] | None = None
        worker_died = False
        try:
            if self.table.get(job.id).cancel_requested:
                actor.cancel.remote(job.id)
            async for ref in actor.run_job.remote(job.id, job.spec):
                event = await ref
                if event.get("kind") == "outcome":
                    outcome = event
                    break
                message = str(event.pop("message", event.get("kind", "progress")))
                kind = str(event.pop("kind", "progress"))
                self.table.add_event(job.id, kind, message, event)
                await self.notify()
        except (RayActorError, WorkerCrashedError) as exc:
            worker_died = True
            self._handle_worker_death(job, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("job failed in the engine", extra={"job_id": job.id})
            self.table.finish(job.id, jt.FAILED, message="engine error", error=repr(exc))
        else:
            self._record_outcome(job, outcome)
        finally:
            self._running.pop(job.id, None)
            self.metrics.job_finished(time.monotonic() - started)
            self.metrics.observe_table(self.table)
            if worker_died:
                await self._await_restart(actor)
            self._idle.put_nowait(actor)
            self.wake()
            await self.notify()

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

    def _record_outcome(self, job: jt.JobRecord, outcome: dict[str, Any] | None) -> None:
        if outcome is None:
            self.table.finish(job.id, jt.FAILED, message="worker ended", error="no outcome")
            return
        state = outcome.get("state", jt.FAILED)
        message = {
            jt.SUCCEEDED: f"version {outcome.get('version_id')} published",
            jt.CANCELLED: "cancelled; nothing published",
        }.get(state, "job failed")
        self.table.finish(
            job.id,
            state,
            message=message,
            version_id=outcome.get("version_id"),
            metrics={k: float(v) for k, v in (outcome.get("metrics") or {}).items()},
            gates=outcome.get("gates") or [],
            error=outcome.get("error", ""),
        )
        log.info("job finished", extra={"job_id": job.id, "state": state})

    def _handle_worker_death(self, job: jt.JobRecord, exc: Exception) -> None:
        current = self.table.get(job.id)
        reason = f"worker process died: {type(exc).__name__}"
        log.error("worker died during a job", extra={"job_id": job.id})
        if current.cancel_requested:
            self.table.finish(job.id, jt.CANCELLED, message=f"{reason}; cancelled")
        elif current.attempts < self.settings.max_attempts:
            self.table.requeue(job.id, f"{reason}; retrying")
        else:
            self.table.finish(
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
