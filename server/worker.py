"""The Ray actor that keeps base models warm and runs jobs, generation and imports.

``run_job`` is a streaming generator: the server iterates its progress events as they happen and
reads the outcome from the last one. The actor is threaded (``max_concurrency``) so ``cancel``
and ``generate`` are served while a job runs.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import ray
import torch
from torch.utils.hooks import RemovableHandle

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.editing.attachments import attach_hooks, stored_hook_artifacts
from modelsurgery.evaluation.judge import Reference, judge
from modelsurgery.evaluation.lineage import lineage_suites, own_suite
from modelsurgery.evaluation.measure import JobMeasurements
from modelsurgery.evaluation.metrics import EvaluationSettings
from modelsurgery.evaluation.perplexity import PerplexityCache
from modelsurgery.evaluation.suite import Suite, job_protocol
from modelsurgery.models.placement import on_gpus
from modelsurgery.proto.job_state import JobState
from modelsurgery.server.auth import ANONYMOUS, Caller
from modelsurgery.server.concepts import concept_predictions
from modelsurgery.server.disk import is_disk_full
from modelsurgery.server.executor import WorkerSettings, execute_job, load_base
from modelsurgery.server.generation import generate_text
from modelsurgery.server.logs import configure_logging, quiet_progress_bars
from modelsurgery.server.model_cache import ModelCache
from modelsurgery.server.outcome import JobOutcome
from modelsurgery.server.redact import caller_message

_DONE = object()
log = logging.getLogger("modelsurgery.worker")


def _task_cancelled() -> bool:
    """Whether the server cancelled the Ray task running this (``ray.cancel`` sets a flag
    that a threaded actor's task reads; outside a Ray worker there is none, and asking for
    the runtime context there would start a Ray cluster)."""
    if not ray.is_initialized():
        return False
    try:
        return ray.get_runtime_context().is_canceled()
    except RuntimeError:  # a driver, not a worker
        return False


def _in_ray_actor() -> bool:
    """Whether this process is a Ray actor (a worker the server started), not the driver or a
    test building a worker in its own process, whose logging is not ours to set."""
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


class EvaluationStopped(RuntimeError):
    """An evaluation stopped because the server cancelled its task (its caller went away)."""


class SurgeryWorker:
    def __init__(self, settings: WorkerSettings, num_threads: int) -> None:
        torch.set_num_threads(max(1, num_threads))
        if _in_ray_actor():
            # JSON records on stderr, which Ray forwards to the server's log (its relay); no
            # progress bars there (tqdm frames would become records).
            configure_logging()
        else:
            quiet_progress_bars()
        gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
        if gpu_ids and torch.cuda.is_available():
            settings.placement = on_gpus(settings.placement, torch.cuda.device_count())
        log.info(
            "worker started",
            extra={"devices": list(settings.placement.devices), "threads": num_threads},
        )
        self.settings = settings
        self.store = CheckpointStore(settings.store_root)
        self.cache = ModelCache(settings.max_cache_bytes)
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "device": self.settings.placement.main,
            "devices": list(self.settings.placement.devices),
            "cached_models": self.cache.digests(),
            "cache_hits": self.cache.hits,
            "cache_misses": self.cache.misses,
        }

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancelled.add(job_id)

    def _is_cancelled(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancelled

    def run_job(
        self,
        job_id: str,
        spec: dict[str, Any],
        caller: Caller = ANONYMOUS,
        base_version: str | None = None,
    ) -> Iterator[dict[str, Any] | JobOutcome]:
        """Yields progress events, then the ``JobOutcome`` (the last item)."""
        events: queue.Queue[Any] = queue.Queue()
        outcome = JobOutcome(JobState.FAILED, error="no outcome")

        def work() -> None:
            nonlocal outcome
            try:
                outcome = execute_job(
                    spec,
                    store=self.store,
                    cache=self.cache,
                    settings=self.settings,
                    emit=events.put,
                    is_cancelled=lambda: self._is_cancelled(job_id),
                    base_version=base_version,
                    caller=caller,
                    job_id=job_id,
                )
            except Exception as exc:
                # The traceback stays in the worker's log; the job row gets a message for the
                # caller, without the server's paths.
                log.exception("job %s failed", job_id)
                outcome = JobOutcome(
                    JobState.FAILED,
                    error=caller_message(exc, self.settings),
                    retryable=is_disk_full(exc),
                )
            finally:
                events.put(_DONE)

        thread = threading.Thread(target=work, name=f"job-{job_id}", daemon=True)
        thread.start()
        while (event := events.get()) is not _DONE:
            yield event
        thread.join()
        with self._lock:
            self._cancelled.discard(job_id)
        yield outcome

    def import_model(self, reference: str) -> str:
        return load_base(reference, self.store, self.cache, self.settings).version_id

    def generate(
        self, ref: str, prompts: list[str], options: dict[str, Any], timeout_s: float
    ) -> list[str]:
        """Greedy or sampled text from a version, stopped (``GenerationStopped``) once the
        server cancels this task (its caller went away) or ``timeout_s`` passes.

        It runs on the warm model itself, under its lock (no copy: the weights are held once);
        a version's hooks (ReFT interventions, unbaked steering) are attached for this call
        only. A job on the same model waits for it, at most until its timeout."""
        base = load_base(ref, self.store, self.cache, self.settings)
        artifacts = stored_hook_artifacts(self.store, self.store.resolve(ref))
        deadline = time.monotonic() + timeout_s

        def should_stop() -> bool:
            return time.monotonic() > deadline or _task_cancelled()

        with base.lock, attach_hooks(base.model, artifacts):
            return generate_text(
                base.model, base.tokenizer, prompts, should_stop=should_stop, **options
            )

    def predict_concepts(
        self,
        ref: str,
        texts: list[str],
        corrections: list[dict[str, str]] | None,
        explain: bool = False,
    ) -> list[dict[str, Any]]:
        """A concept_bottleneck version's predictions (``server.concepts``), on the warm
        model under its lock with the version's hooks attached for this call only."""
        base = load_base(ref, self.store, self.cache, self.settings)
        artifacts = stored_hook_artifacts(self.store, self.store.resolve(ref))
        with base.lock, attach_hooks(base.model, artifacts):
            return concept_predictions(base.model, base.tokenizer, texts, corrections, explain)

    def evaluate(
        self, version_id: str, against_id: str, suite_json: bytes, perplexity: bool
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Judge a stored version against another on its own stored suite (or the given one)
        and its ancestors' suites, as the job that made it was judged: the metrics, and each
        fact's and pair's own result (``evaluation.cases``).

        The two may be one warm model (equal weights: a hook version against its parent, a
        revert against what it restores): each distinct model is locked once, and the
        version's hooks come off while the reference is read. The evaluation stops
        (``EvaluationStopped``) at the next forward pass once the server cancels its task."""
        suite = Suite.from_bytes(suite_json) if suite_json else own_suite(self.store, version_id)
        suite = suite or Suite()
        parent = self.store.get(version_id).parent
        lineage = lineage_suites(self.store, parent) if parent else []
        protocol = suite.perplexity or (job_protocol(EvaluationSettings()) if perplexity else None)
        final = load_base(version_id, self.store, self.cache, self.settings)
        reference = load_base(against_id, self.store, self.cache, self.settings)
        artifacts = stored_hook_artifacts(self.store, version_id)
        shared = final.model is reference.model
        with ExitStack() as held:
            # Warm models are shared with jobs and other evaluations: lock each distinct one
            # once, in one global order (no deadlock).
            for _, lock in sorted({id(m.lock): m.lock for m in (final, reference)}.items()):
                held.enter_context(lock)
            for model in {id(m.model): m.model for m in (final, reference)}.values():
                held.callback(_stop_when_cancelled(model).remove)
            hooks = _LiftableHooks(final.model, artifacts)
            held.callback(hooks.remove)
            measurements = JobMeasurements(
                final.tokenizer,
                protocol,
                base_digest=reference.digest,
                cache=PerplexityCache(self.settings.cache_dir),
            )
            judged = judge(
                final.model,
                Reference(reference.model, hooks if shared else None),
                suite,
                lineage,
                measurements=measurements,
            )
            return judged.metrics, [case.to_dict() for case in judged.cases]


def _stop_when_cancelled(model: torch.nn.Module) -> RemovableHandle:
    """A check before every forward pass of ``model`` (each batch an evaluation measures)
    that raises ``EvaluationStopped`` once the server cancelled this task."""

    def check(module: torch.nn.Module, args: Any) -> None:
        if _task_cancelled():
            raise EvaluationStopped("evaluation stopped: its caller went away")

    return model.get_input_embeddings().register_forward_pre_hook(check)


class _LiftableHooks:
    """A version's hooks, attached to a warm model for one evaluation. Entered (as the
    ``Reference``'s lock when the reference is that same model) it lifts them while the
    reference is read, and puts them back on leaving; judge enters it once per reading."""

    def __init__(self, model: torch.nn.Module, artifacts: dict[str, bytes]) -> None:
        self.model = model
        self.artifacts = artifacts
        self.attached = attach_hooks(model, artifacts)

    def remove(self) -> None:
        self.attached.remove()

    def __enter__(self) -> None:
        self.attached.remove()

    def __exit__(self, *exc: object) -> None:
        self.attached = attach_hooks(self.model, self.artifacts)
