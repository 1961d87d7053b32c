"""The Ray side of the engine: starting (or joining) Ray and the pool of worker actors.

Embedded Ray by default (``ray.init(address="local", num_cpus=...)`` in the server process,
dashboard off: a fresh cluster of its own even when ``ray start`` left one on the machine), or an
existing cluster only when ``ray_address`` names one (``--ray-address`` / ``RAY_ADDRESS``).
Each worker asks for CPUs one node can give (``worker_cpus``, by default what the smallest node
has, or less so that all workers fit), workers spread over the nodes, and what they print
reaches the server's log (``log_to_driver``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import ray
from ray.exceptions import RayActorError, WorkerCrashedError

from modelsurgery.server.credentials import private_ray_token
from modelsurgery.server.executor import WorkerSettings
from modelsurgery.server.worker import SurgeryWorker

GCS_PORT_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"
GCS_PORT_WAIT_SECONDS = "120"

log = logging.getLogger("modelsurgery.engine")


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


def start_ray(ray_address: str | None, num_cpus: int | None) -> bool:
    """Start or join Ray unless it runs in this process already; True when this call did
    (the caller then owns it and shuts it down)."""
    if ray.is_initialized():
        return False
    if ray_address:
        ray.init(address=ray_address, log_to_driver=True)
    else:
        # Ray waits 30 s for its GCS to publish a port; a loaded CI machine (two cores, a
        # server just stopped beside it) has taken longer. The operator's value wins.
        os.environ.setdefault(GCS_PORT_WAIT_ENV, GCS_PORT_WAIT_SECONDS)
        private_ray_token()
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
        )
    return True


class WorkerPool:
    """The worker actors: idle ones wait in a queue for the dispatcher; short requests
    (generation, import, evaluation) go to the least busy one, beside jobs."""

    def __init__(self) -> None:
        self.actors: list[Any] = []
        self.idle: asyncio.Queue[Any] = asyncio.Queue()
        self.busy: dict[str, Any] = {}  # job id -> the actor running it

    def start(
        self, settings: WorkerSettings, workers: int, cpus: int | None, gpus_per_worker: float
    ) -> None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= gpus_per_worker
        nodes = node_cpus()
        cpus = cpus or worker_cpus(nodes, workers)
        if nodes and cpus > max(nodes):
            log.warning(
                "no Ray node has the CPUs a worker asks for: workers stay pending",
                extra={"cpus_per_worker": cpus, "largest_node_cpus": max(nodes)},
            )
        actor_class = ray.remote(SurgeryWorker).options(
            num_cpus=cpus,
            num_gpus=gpus_per_worker if use_gpu else 0,
            scheduling_strategy="SPREAD",
            max_concurrency=8,
            max_restarts=-1,
            max_task_retries=0,
        )
        for _ in range(workers):
            actor = actor_class.remote(settings, cpus)
            self.actors.append(actor)
            self.idle.put_nowait(actor)
        log.info(
            "job engine started",
            extra={
                "workers": workers,
                "cpus_per_worker": cpus,
                "gpu": use_gpu,
                "nodes": len(nodes),
            },
        )

    def kill_all(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors.clear()

    def any_actor(self) -> Any:
        """A worker for short requests; one without a job when there is one."""
        if not self.actors:
            raise RuntimeError("job engine is not started")
        return min(self.actors, key=lambda a: a in self.busy.values())

    async def call(self, method: str, *args: Any) -> Any:
        return await getattr(self.any_actor(), method).remote(*args)

    async def info(self) -> list[dict[str, Any]]:
        return [await actor.info.remote() for actor in self.actors]

    @staticmethod
    async def await_restart(actor: Any, timeout: float = 600.0) -> None:
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
