"""One operation's independent batches spread over Ray helper actors (``serve --fan-out N``).

Each helper holds a copy of the model the operation hands over (sent once through the object
store) and runs the operation's task on the payloads it is given, one at a time; the job's
worker only dispatches, collects and checks for cancellation. Helpers live for one fan-out
and are killed when it ends, is cancelled or fails. Helpers that cannot be placed within
``start_timeout_s`` (a cluster without free CPUs) are left out; with none placed the batches
run in the worker itself, so a job never waits on a cluster that cannot host its helpers.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from modelsurgery.editing.fan_out import FanOutTask, run_here
from modelsurgery.editing.registry import MethodContext
from modelsurgery.models.placement import spread_over_devices

log = logging.getLogger("modelsurgery.fan_out")


class ModelHolder:
    """A helper: the model and tokenizer of one fan-out, and the task runner."""

    def __init__(self, bundle: tuple[Any, Any], threads: int, cache_dir: str) -> None:
        torch.set_num_threads(max(1, threads))
        self.model, self.tokenizer = bundle
        self.cache_dir = Path(cache_dir)

    def ready(self) -> bool:
        return True

    def run(self, task: FanOutTask, payload: Any, digest: str) -> Any:
        """The task with a quiet context: its progress stays here (the worker reports per
        finished payload) and cancellation is the worker's (it kills the helper)."""
        device = next(self.model.parameters()).device
        context = MethodContext(model_digest=digest, cache_dir=self.cache_dir, device=device)
        return task(self.model, self.tokenizer, payload, context)


@dataclass(frozen=True)
class RayFanOut:
    helpers: int
    cpus_per_helper: float = 1.0
    start_timeout_s: float = 120.0
    poll_s: float = 1.0

    def __call__(
        self,
        task: FanOutTask,
        model: Any,
        tokenizer: Any,
        payloads: Sequence[Any],
        context: MethodContext,
    ) -> Iterator[tuple[int, Any]]:
        wanted = min(self.helpers, len(payloads))
        if wanted < 2 or spread_over_devices(model):
            # A model placed over several devices fits no one helper's device.
            yield from run_here(task, model, tokenizer, payloads, context)
            return
        on_gpu = next(model.parameters()).device.type == "cuda"
        holder = ray.remote(ModelHolder).options(
            num_cpus=self.cpus_per_helper,
            num_gpus=1 if on_gpu else 0,
            scheduling_strategy="SPREAD",
            max_restarts=0,
        )
        bundle = ray.put((model, tokenizer))
        threads = int(self.cpus_per_helper)
        actors = [holder.remote(bundle, threads, str(context.cache_dir)) for _ in range(wanted)]
        try:
            placed = self._placed(actors)
            context.progress("fan-out", helpers=len(placed), payloads=len(payloads))
            if not placed:
                log.warning("no fan-out helper could be placed: running the batches here")
                yield from run_here(task, model, tokenizer, payloads, context)
                return
            yield from self._dispatch(placed, task, payloads, context)
        finally:
            for actor in actors:
                ray.kill(actor)

    def _placed(self, actors: list[Any]) -> list[Any]:
        probes = {actor.ready.remote(): actor for actor in actors}
        ready, _ = ray.wait(list(probes), num_returns=len(probes), timeout=self.start_timeout_s)
        return [probes[ref] for ref in ready]

    def _dispatch(
        self, idle: list[Any], task: FanOutTask, payloads: Sequence[Any], context: MethodContext
    ) -> Iterator[tuple[int, Any]]:
        waiting = deque(enumerate(payloads))
        running: dict[Any, tuple[int, Any]] = {}
        while waiting or running:
            while idle and waiting:
                index, payload = waiting.popleft()
                actor = idle.pop()
                running[actor.run.remote(task, payload, context.model_digest)] = (index, actor)
            done, _ = ray.wait(list(running), num_returns=1, timeout=self.poll_s)
            context.check_cancelled()
            for ref in done:
                index, actor = running.pop(ref)
                idle.append(actor)
                yield index, ray.get(ref)


def fan_out_for(helpers: int, cpus_per_helper: float) -> Any:
    """The job's fan-out: Ray helpers when asked for and Ray is up, else this process."""
    if helpers > 1 and ray.is_initialized():
        return RayFanOut(helpers, cpus_per_helper)
    return run_here
