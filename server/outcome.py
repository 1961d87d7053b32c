"""What a job ended with, typed as it crosses the Ray hop, and the one way a published version
settles its job (used by the executor right after publishing and by a server taking over a job
whose server died after publishing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from modelsurgery.checkpoints import CheckpointStore, Manifest
from modelsurgery.proto.job_state import JobState
from modelsurgery.proto.spec import JobSpec
from modelsurgery.server.auth import Caller
from modelsurgery.server.permissions import AliasPolicy, PermissionDenied

if TYPE_CHECKING:
    import torch

# How a SUCCEEDED job's error starts when its version was published but its alias refused.
ALIAS_NOT_MOVED = "version published; alias not moved"
# How a FAILED job's error ends when ``keep_failed`` kept its candidate.
KEPT = "candidate kept as version"


class Candidate(Protocol):
    """What a job's operations produced (the executor's run record)."""

    changed: dict[str, torch.Tensor]
    overrides: dict[str, Any]
    artifacts: dict[str, bytes]
    operations: list[dict[str, Any]]


@dataclass(frozen=True)
class GateResult:
    metric: str
    condition: str
    value: float | None
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class JobOutcome:
    state: JobState
    version_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    gates: list[GateResult] = field(default_factory=list)
    error: str = ""
    # The failure was the server's, not the job's (a full disk): worth another attempt.
    retryable: bool = False

    def row_fields(self) -> dict[str, Any]:
        """What ``JobTable.finish`` records of this outcome besides its state."""
        return {
            "version_id": self.version_id,
            "metrics": self.metrics,
            "gates": [g.to_dict() for g in self.gates],
            "error": self.error,
        }

    def failed_gates_message(self) -> str:
        """``gates failed: ...`` naming each failed gate with its value and condition."""
        reasons = ", ".join(
            f"{g.metric}={g.value} (needs {g.condition})"
            if g.value is not None
            else f"{g.metric} not measured"
            for g in self.gates
            if not g.passed
        )
        return f"gates failed: {reasons}"

    def kept(self, version_id: str) -> None:
        """FAILED on its gates, with the candidate ``keep_failed`` kept as ``version_id``."""
        self.state, self.version_id = JobState.FAILED, version_id
        self.error = f"{self.failed_gates_message()}; {KEPT} {version_id} (keep_failed)"


def evaluate_gates(spec: JobSpec, metrics: dict[str, float]) -> list[GateResult]:
    results = []
    for name, gate in spec.parsed_gates().items():
        value = metrics.get(name)
        results.append(GateResult(name, str(gate), value, value is not None and gate.holds(value)))
    return results


def keep_candidate(
    store: CheckpointStore,
    parent: str,
    run: Candidate,
    outcome: JobOutcome,
    job_id: str | None,
) -> None:
    """``keep_failed``: store the candidate that failed its gates as a version marked with
    them (``Manifest.failed_gates``, the card says so) and no alias; the job stays FAILED,
    its ``version_id`` and error naming the kept version."""
    manifest = store.commit(
        parent,
        run.changed,
        operations=run.operations,
        metrics=outcome.metrics,
        config_overrides=run.overrides or None,
        artifacts=run.artifacts or None,
        job_id=job_id,
        failed_gates=[g.to_dict() for g in outcome.gates],
    )
    outcome.kept(manifest.id)


def settle_published(
    spec: JobSpec, manifest: Manifest, store: CheckpointStore, caller: Caller, policy: AliasPolicy
) -> JobOutcome:
    """The outcome of a job whose version ``manifest`` is published: its gates judged on the
    stored metrics (they held, or nothing would have been published), and the spec's alias
    moved to the version if it does not point there yet.

    The move is authorised now, not only at submit: the alias may have been created or moved
    by another caller while the job waited. ``caller`` (who submitted the job, with the role
    it had then) owns the alias if the move creates it. A refused move fails the alias step,
    not the publish: the job still SUCCEEDED with its version, and ``error`` says why the
    alias was not moved."""
    metrics = {name: float(value) for name, value in manifest.metrics.items()}
    outcome = JobOutcome(
        JobState.SUCCEEDED,
        version_id=manifest.id,
        metrics=metrics,
        gates=evaluate_gates(spec, metrics),
    )
    if manifest.failed_gates:
        # A candidate kept by ``keep_failed``: its job failed, and no alias moves to it.
        outcome.kept(manifest.id)
        return outcome
    if spec.alias and store.get_alias(spec.alias) != manifest.id:
        try:
            store.set_alias(
                spec.alias,
                manifest.id,
                owner=caller.name,
                authorize=policy.authorizer(caller, spec.alias, "spec.alias"),
            )
        except PermissionDenied as exc:
            outcome.error = f"{ALIAS_NOT_MOVED}: {exc}"
    return outcome
