"""Runs one job's operations on a private copy of a warm base model and publishes the result.

Independent of Ray and gRPC: the Ray worker calls it, tests can too. Order of effects: run the
operations, judge the final model against the job's base and lineage (``evaluation``), check
the gates on those figures, and only when every gate holds commit the version (blobs first,
manifest last, the judged suite stored with it) and move the alias. A failed gate or a
cancellation publishes nothing. Metrics: unprefixed and ``lineage_*`` for the final model,
``op<i>.<name>`` for each operation's own figures.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelsurgery.checkpoints import CheckpointStore, VersionNotFoundError
from modelsurgery.editing.attachments import attach_hooks
from modelsurgery.editing.registry import JobCancelled, MethodContext, get_method
from modelsurgery.evaluation.judge import Judgement, PerplexityCache, Reference, judge
from modelsurgery.evaluation.lineage import lineage_suites
from modelsurgery.evaluation.metrics import wants_perplexity
from modelsurgery.evaluation.suite import (
    SUITE_ARTIFACT,
    carried_suite,
    default_protocol,
    operation_protocol,
)
from modelsurgery.models import load
from modelsurgery.models.digest import model_digest
from modelsurgery.proto.spec import JobSpec, parse_spec
from modelsurgery.server.fan_out import fan_out_for
from modelsurgery.server.model_cache import CachedModel, ModelCache, parameter_bytes

Emit = Callable[[dict[str, Any]], None]


@dataclass
class JobOutcome:
    state: str
    version_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    gates: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""


@dataclass
class WorkerSettings:
    store_root: Path
    cache_dir: Path
    data_roots: tuple[Path, ...] = ()
    model_roots: tuple[Path, ...] | None = None
    max_cache_bytes: int = 8 << 30
    device: str = "cpu"
    # Helper actors one operation's independent batches spread over (MEMIT's v*), and the
    # CPUs each asks Ray for; 1 = the batches run in the job's worker.
    fan_out: int = 1
    fan_out_cpus: float = 1.0


def load_base(
    reference: str, store: CheckpointStore, cache: ModelCache, settings: WorkerSettings
) -> CachedModel:
    """The warm model for a spec's base: a stored version or alias, else a model reference
    (imported into the store first, so every version has a root in the store)."""

    def from_store(version_id: str) -> CachedModel:
        loaded = load(version_id, store=store, device=settings.device, with_hooks=False)
        return CachedModel(
            loaded.model, loaded.tokenizer, loaded.digest, version_id, parameter_bytes(loaded.model)
        )

    def from_reference() -> CachedModel:
        loaded = load(reference, device=settings.device, allowed_roots=settings.model_roots)
        manifest = store.import_model(
            loaded.model, loaded.tokenizer, reference=reference, revision=loaded.revision
        )
        return CachedModel(
            loaded.model,
            loaded.tokenizer,
            loaded.digest,
            manifest.id,
            parameter_bytes(loaded.model),
        )

    try:
        version_id = store.resolve(reference)
    except VersionNotFoundError:
        return cache.get_or_load(f"ref:{reference}", from_reference)
    return cache.get_or_load(f"version:{version_id}", lambda: from_store(version_id))


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


def evaluate_gates(spec: JobSpec, metrics: dict[str, float]) -> list[dict[str, Any]]:
    results = []
    for name, gate in spec.parsed_gates().items():
        value = metrics.get(name)
        results.append(
            {
                "metric": name,
                "condition": str(gate),
                "value": value,
                "passed": value is not None and gate.holds(value),
            }
        )
    return results


def execute_job(
    spec_data: dict[str, Any],
    *,
    store: CheckpointStore,
    cache: ModelCache,
    settings: WorkerSettings,
    emit: Emit,
    is_cancelled: Callable[[], bool],
    caller: str = "",
    job_id: str | None = None,
) -> JobOutcome:
    """Run one job; ``caller`` (who submitted it) becomes the owner of an alias it creates
    (SubmitJob already checked that the caller may move the spec's alias); the version's
    manifest names ``job_id``, which makes the publish the job's commit point."""
    spec = parse_spec(spec_data)
    started = time.perf_counter()
    emit({"kind": "progress", "message": "loading base model", "base": spec.base})
    base = load_base(spec.base, store, cache, settings)
    emit({"kind": "progress", "message": "base model ready", "version_id": base.version_id})
    with base.lock:
        model = copy.deepcopy(base.model)
    digest = base.digest
    changed: dict[str, torch.Tensor] = {}
    overrides: dict[str, Any] = {}
    artifacts: dict[str, bytes] = {}
    metrics: dict[str, float] = {}
    operations: list[dict[str, Any]] = []
    suites: list[dict[str, list[dict[str, Any]]]] = []
    try:
        for index, operation in enumerate(spec.operations):
            if is_cancelled():
                raise JobCancelled()
            method = get_method(operation.method)
            operation = operation.resolved(model.config)
            context = MethodContext(
                model_digest=digest,
                cache_dir=settings.cache_dir,
                data_roots=settings.data_roots,
                device=torch.device(settings.device),
                report=lambda event, i=index: emit({"kind": "progress", "operation": i, **event}),
                is_cancelled=is_cancelled,
                read_artifact=artifact_reader(store, base.version_id, artifacts),
                fan_out=fan_out_for(settings.fan_out, settings.fan_out_cpus),
            )
            emit({"kind": "progress", "message": f"running {operation.method}", "operation": index})
            result = method.run(model, base.tokenizer, operation, context)
            changed.update({name: t.detach().cpu().clone() for name, t in result.changed.items()})
            overrides.update(result.config_overrides)
            artifacts.update(result.artifacts)
            metrics.update({f"op{index}.{name}": v for name, v in result.metrics.items()})
            suites.append(result.suite)
            operations.append({**operation.model_dump(mode="json"), **result.resolved})
            if index + 1 < len(spec.operations) and result.changed:
                digest = model_digest(model)
        if is_cancelled():
            raise JobCancelled()
        emit({"kind": "progress", "message": "evaluating the final model against the base"})
        judgement = evaluate_final(model, base, spec, suites, metrics, artifacts, store, settings)
    except JobCancelled:
        return JobOutcome("CANCELLED", metrics=metrics, error="cancelled by request")
    finally:
        del model
    metrics.update(judgement.metrics)
    if not judgement.suite.empty:
        artifacts[SUITE_ARTIFACT] = judgement.suite.to_bytes()
    metrics["job_seconds"] = time.perf_counter() - started
    gates = evaluate_gates(spec, metrics)
    failed = [g for g in gates if not g["passed"]]
    if failed:
        reasons = ", ".join(
            f"{g['metric']}={g['value']} (needs {g['condition']})"
            if g["value"] is not None
            else f"{g['metric']} not measured"
            for g in failed
        )
        return JobOutcome("FAILED", metrics=metrics, gates=gates, error=f"gates failed: {reasons}")
    if is_cancelled():
        return JobOutcome("CANCELLED", metrics=metrics, gates=gates, error="cancelled by request")
    emit({"kind": "progress", "message": "writing version", "tensors": len(changed)})
    manifest = store.commit(
        base.version_id,
        changed,
        operations=operations,
        metrics=metrics,
        config_overrides=overrides or None,
        artifacts=artifacts or None,
        job_id=job_id,
    )
    if spec.alias:
        store.set_alias(spec.alias, manifest.id, owner=caller)
    return JobOutcome("SUCCEEDED", version_id=manifest.id, metrics=metrics, gates=gates)


def evaluate_final(
    model: torch.nn.Module,
    base: CachedModel,
    spec: JobSpec,
    suites: list[dict[str, list[dict[str, Any]]]],
    op_metrics: dict[str, float],
    artifacts: dict[str, bytes],
    store: CheckpointStore,
    settings: WorkerSettings,
) -> Judgement:
    """The job-level evaluation: the final model (with any hook artifacts attached) against
    the job's base, on the operations' suites and the lineage's stored ones; perplexity when
    a gate or an operation asks for it, reusing what the first and last operation measured
    with the same protocol."""
    protocol = default_protocol() if wants_perplexity(spec.gates, spec.operations) else None
    known: dict[str, float | None] = {"base": None, "final": None}
    if protocol is not None:
        same = (protocol.tokens, protocol.window)
        last = len(spec.operations) - 1
        if operation_protocol(spec.operations[0]) == same:
            known["base"] = op_metrics.get("op0.perplexity_before")
        if operation_protocol(spec.operations[last]) == same:
            known["final"] = op_metrics.get(f"op{last}.perplexity_after")
    with attach_hooks(model, artifacts):
        return judge(
            model,
            Reference(base.model, base.digest, base.lock),
            base.tokenizer,
            carried_suite(suites),
            lineage_suites(store, base.version_id),
            perplexity=protocol,
            base_perplexity=known["base"],
            final_perplexity=known["final"],
            cache=PerplexityCache(settings.cache_dir),
        )
