"""Runs one job's operations on a warm base model, in place, and publishes the result.

Independent of Ray and gRPC: the Ray worker calls it, tests can too. Order of effects: run the
operations, judge the final model against the job's base and lineage (``evaluation``), check
the gates on those figures, and only when every gate holds commit the version (blobs first,
manifest last, the judged suite stored with it) and move the alias. A failed gate or a
cancellation publishes nothing. The job holds the warm model's lock from its first operation
until the model is put back as it found it (``in_place``): the weights are held once.
Metrics: unprefixed and ``lineage_*`` for the final model, ``op<i>.<name>`` for each
operation's own figures.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelsurgery.checkpoints import CheckpointStore, VersionNotFoundError
from modelsurgery.checkpoints.hf import model_files, tokenizer_files
from modelsurgery.editing.attachments import attach_hooks
from modelsurgery.editing.knowledge.facts import Fact
from modelsurgery.editing.registry import JobCancelled, MethodConfig, MethodContext, get_method
from modelsurgery.evaluation.judge import Judgement, Reference, judge
from modelsurgery.evaluation.lineage import lineage_suites
from modelsurgery.evaluation.measure import JobMeasurements
from modelsurgery.evaluation.metrics import FACTS, operation_measures, wants_perplexity
from modelsurgery.evaluation.perplexity import PerplexityCache
from modelsurgery.evaluation.suite import SUITE_ARTIFACT, carried_suite, job_protocol
from modelsurgery.models import LoadedModel, load
from modelsurgery.models.digest import combined_digest, files_digest, model_digest
from modelsurgery.models.memory import give_back_freed_memory
from modelsurgery.models.placement import Placement
from modelsurgery.proto.job_state import JobState
from modelsurgery.proto.spec import JobSpec, parse_spec
from modelsurgery.server.auth import ANONYMOUS, Caller
from modelsurgery.server.fan_out import fan_out_for
from modelsurgery.server.in_place import InPlaceEdit, ReadOriginal
from modelsurgery.server.model_cache import CachedModel, ModelCache, parameter_bytes
from modelsurgery.server.outcome import (
    JobOutcome,
    evaluate_gates,
    keep_candidate,
    settle_published,
)
from modelsurgery.server.permissions import AliasPolicy

Emit = Callable[[dict[str, Any]], None]
log = logging.getLogger("modelsurgery.executor")


@dataclass
class WorkerSettings:
    store_root: Path
    cache_dir: Path
    data_roots: tuple[Path, ...] = ()
    model_roots: tuple[Path, ...] | None = None
    max_cache_bytes: int = 8 << 30
    # The devices warm models go on (one, or several with layers spread over them).
    placement: Placement = field(default_factory=Placement)
    # Helper actors one operation's independent batches spread over (MEMIT's v*), and the
    # CPUs each asks Ray for; 1 = the batches run in the job's worker.
    fan_out: int = 1
    fan_out_cpus: float = 1.0
    # The server's shared alias patterns (``AliasPolicy``): a job's alias is authorised again
    # when it publishes, in the worker.
    shared_aliases: tuple[str, ...] = ()


def load_base(
    reference: str, store: CheckpointStore, cache: ModelCache, settings: WorkerSettings
) -> CachedModel:
    """The warm model for a spec's base: a stored version or alias, else a model reference
    (imported into the store first, so every version has a root in the store). Its cache
    identity covers the tokenizer and config as well as the weights (``_cached``)."""

    def from_store(version_id: str) -> CachedModel:
        loaded = load(version_id, store=store, placement=settings.placement, with_hooks=False)
        return _cached(loaded, version_id)

    def from_reference() -> CachedModel:
        loaded = load(reference, allowed_roots=settings.model_roots)
        manifest = store.import_model(
            loaded.model, loaded.tokenizer, reference=reference, revision=loaded.revision
        )
        # The warm model is the stored version, loaded once the reference's is gone: a
        # folder's weights are one memory map whose pages stay resident while any tensor of
        # it lives, so a job could not let go of one (``InPlaceEdit.set_aside``).
        del loaded
        return from_store(manifest.id)

    try:
        version_id = store.resolve(reference)
    except VersionNotFoundError:
        entry = cache.get_or_load(f"ref:{reference}", from_reference)
        cache.remember(f"version:{entry.version_id}", entry)
        return entry
    return cache.get_or_load(f"version:{version_id}", lambda: from_store(version_id))


def _cached(loaded: LoadedModel, version_id: str) -> CachedModel:
    """A loaded model as a cache entry, keyed by its weights, config and tokenizer files (as
    the store keeps them), so a folder with another tokenizer is another model."""
    config = files_digest(model_files(loaded.model))
    tokenizer = "" if loaded.tokenizer is None else files_digest(tokenizer_files(loaded.tokenizer))
    return CachedModel(
        loaded.model,
        loaded.tokenizer,
        combined_digest(loaded.digest, config, tokenizer),
        version_id,
        parameter_bytes(loaded.model),
        module_digest=combined_digest(loaded.digest, config),
    )


def artifact_reader(
    store: CheckpointStore, version_id: str, written: dict[str, bytes]
) -> Callable[[str], bytes | None]:
    """``MethodContext.read_artifact``: this job's files so far, else the base version's."""

    def read(name: str) -> bytes | None:
        if name in written:
            return written[name]
        try:
            return store.read_file(version_id, name)
        except KeyError:
            return None

    return read


def _operation_facts(operation: MethodConfig) -> list[Fact]:
    """The facts an operation carries (scored around it when it asks)."""
    if FACTS not in operation.carries:
        return []
    return [Fact.model_validate(f) for f in operation.suite().get(FACTS, [])]  # type: ignore[attr-defined]


@dataclass
class _JobRun:
    """What a job's operations produced so far (a cancelled job reports its metrics).
    ``changed`` holds the model's tensors themselves (on CPU): the version is written from
    them before the model is put back."""

    changed: dict[str, torch.Tensor] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, bytes] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    operations: list[dict[str, Any]] = field(default_factory=list)
    suites: list[dict[str, list[dict[str, Any]]]] = field(default_factory=list)


def original_reader(store: CheckpointStore, version_id: str) -> ReadOriginal:
    """The base version's tensors by name: what ``InPlaceEdit`` reads written tensors back from."""
    entries = store.tensor_entries(version_id)

    def read(name: str) -> torch.Tensor | None:
        return store.tensor(version_id, name) if name in entries else None

    return read


def _put_back(edit: InPlaceEdit, base: CachedModel, cache: ModelCache) -> None:
    """Leave the warm model as the job found it; one that cannot be is dropped from the cache
    (the next job loads it again) rather than served edited."""
    try:
        edit.restore()
    except Exception:
        log.exception("warm model %s could not be restored; dropping it", base.version_id)
        cache.discard(base.digest)
    give_back_freed_memory()


def _operate_and_judge(
    spec: JobSpec,
    base: CachedModel,
    edit: InPlaceEdit,
    run: _JobRun,
    store: CheckpointStore,
    settings: WorkerSettings,
    emit: Emit,
    is_cancelled: Callable[[], bool],
) -> Judgement:
    """Run the operations on the warm model (held under its lock by the caller), then judge
    it against the base, which ``edit.base_view`` puts back while the judge reads it."""
    model = base.model
    digest = base.digest
    protocol = (
        job_protocol(spec.evaluation) if wants_perplexity(spec.gates, spec.operations) else None
    )
    measurements = JobMeasurements(
        base.tokenizer,
        protocol,
        base_digest=base.digest,
        cache=PerplexityCache(settings.cache_dir),
    )
    for index, operation in enumerate(spec.operations):
        if is_cancelled():
            raise JobCancelled()
        method = get_method(operation.method)
        operation = operation.resolved(model.config)
        measures = operation_measures(index, operation, spec.gates)
        facts = _operation_facts(operation)
        if measures:
            emit({"kind": "progress", "message": "measuring before", "operation": index})
            with attach_hooks(model, run.artifacts):
                measurements.before_operation(index, model, measures, facts)
        context = MethodContext(
            model_digest=digest,
            cache_dir=settings.cache_dir,
            data_roots=settings.data_roots,
            device=torch.device(settings.placement.main),
            report=lambda event, i=index: emit({"kind": "progress", "operation": i, **event}),
            is_cancelled=is_cancelled,
            read_artifact=artifact_reader(store, base.version_id, run.artifacts),
            fan_out=fan_out_for(settings.fan_out, settings.fan_out_cpus),
            set_aside=edit.set_aside,
        )
        emit({"kind": "progress", "message": f"running {operation.method}", "operation": index})
        result = method.run(model, base.tokenizer, operation, context)
        edit.note_changed(result.changed)
        edit.let_go_of_replaced()
        give_back_freed_memory()
        run.changed.update({name: t.detach().cpu() for name, t in result.changed.items()})
        run.overrides.update(result.config_overrides)
        run.artifacts.update(result.artifacts)
        if measures:
            emit({"kind": "progress", "message": "measuring after", "operation": index})
            with attach_hooks(model, run.artifacts):
                result.metrics.update(measurements.operation_figures(index, model, measures, facts))
        run.metrics.update({f"op{index}.{name}": v for name, v in result.metrics.items()})
        run.suites.append(result.suite)
        run.operations.append({**operation.model_dump(mode="json"), **result.resolved})
        if index + 1 < len(spec.operations) and result.changed:
            digest = model_digest(model)
    if is_cancelled():
        raise JobCancelled()
    emit({"kind": "progress", "message": "evaluating the final model against the base"})
    with attach_hooks(model, run.artifacts):
        return judge(
            model,
            Reference(model, edit.base_view()),
            carried_suite(run.suites),
            lineage_suites(store, base.version_id),
            measurements=measurements,
            final_state=len(spec.operations),
        )


def execute_job(
    spec_data: dict[str, Any],
    *,
    store: CheckpointStore,
    cache: ModelCache,
    settings: WorkerSettings,
    emit: Emit,
    is_cancelled: Callable[[], bool],
    base_version: str | None = None,
    caller: Caller = ANONYMOUS,
    job_id: str | None = None,
) -> JobOutcome:
    """Run one job on ``base_version``, the version admission pinned (None: resolve the
    spec's base here, for callers without admission: tests and benchmarks). ``caller`` (who
    submitted it, with the role it had then; the local admin without a server) must still
    be allowed to move the spec's alias when the version is published, and owns it if the
    move creates it; the version's manifest names ``job_id``, which makes the publish the
    job's commit point."""
    spec = parse_spec(spec_data)
    started = time.perf_counter()
    emit({"kind": "progress", "message": "loading base model", "base": spec.base})
    base = load_base(base_version or spec.base, store, cache, settings)
    emit({"kind": "progress", "message": "base model ready", "version_id": base.version_id})
    run = _JobRun()
    with base.lock:
        edit = InPlaceEdit(base.model, original_reader(store, base.version_id))
        try:
            judgement = _operate_and_judge(
                spec, base, edit, run, store, settings, emit, is_cancelled
            )
            # The version is written before the model is put back: ``run.changed`` holds the
            # model's own tensors, not copies of them.
            return _settle(
                spec,
                run,
                judgement,
                store,
                settings,
                emit,
                is_cancelled,
                started,
                caller,
                base.version_id,
                job_id,
            )
        except JobCancelled:
            return JobOutcome(JobState.CANCELLED, metrics=run.metrics, error="cancelled by request")
        finally:
            _put_back(edit, base, cache)


def _settle(
    spec: JobSpec,
    run: _JobRun,
    judgement: Judgement,
    store: CheckpointStore,
    settings: WorkerSettings,
    emit: Emit,
    is_cancelled: Callable[[], bool],
    started: float,
    caller: Caller,
    parent: str,
    job_id: str | None,
) -> JobOutcome:
    """Gates on the figures, then the version (or the kept candidate) written."""
    metrics = run.metrics
    metrics.update(judgement.metrics)
    if not judgement.suite.empty:
        run.artifacts[SUITE_ARTIFACT] = judgement.suite.to_bytes()
    metrics["job_seconds"] = time.perf_counter() - started
    outcome = JobOutcome(JobState.FAILED, metrics=metrics, gates=evaluate_gates(spec, metrics))
    if not all(g.passed for g in outcome.gates):
        outcome.error = outcome.failed_gates_message()
        if spec.keep_failed and not is_cancelled():
            keep_candidate(store, parent, run, outcome, job_id)
        return outcome
    if is_cancelled():
        outcome.state, outcome.error = JobState.CANCELLED, "cancelled by request"
        return outcome
    emit({"kind": "progress", "message": "writing version", "tensors": len(run.changed)})
    manifest = store.commit(
        parent,
        run.changed,
        operations=run.operations,
        metrics=metrics,
        config_overrides=run.overrides or None,
        artifacts=run.artifacts or None,
        job_id=job_id,
    )
    return settle_published(spec, manifest, store, caller, AliasPolicy(settings.shared_aliases))
