"""What a job ended with, typed as it crosses the Ray hop, and the one way a published version
settles its job (used by the executor right after publishing and by a server taking over a job
whose server died after publishing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from modelsurgery.checkpoints import CheckpointStore, Manifest
from modelsurgery.proto.job_state import JobState
from modelsurgery.proto.spec import JobSpec


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


def evaluate_gates(spec: JobSpec, metrics: dict[str, float]) -> list[GateResult]:
    results = []
    for name, gate in spec.parsed_gates().items():
        value = metrics.get(name)
        results.append(GateResult(name, str(gate), value, value is not None and gate.holds(value)))
    return results


def settle_published(
    spec: JobSpec, manifest: Manifest, store: CheckpointStore, caller: str
) -> JobOutcome:
    """The outcome of a job whose version ``manifest`` is published: its gates judged on the
    stored metrics (they held, or nothing would have been published), and the spec's alias
    moved to the version if it does not point there yet (``caller`` owns a new alias)."""
    metrics = {name: float(value) for name, value in manifest.metrics.items()}
    if spec.alias and store.get_alias(spec.alias) != manifest.id:
        store.set_alias(spec.alias, manifest.id, owner=caller)
    return JobOutcome(
        JobState.SUCCEEDED,
        version_id=manifest.id,
        metrics=metrics,
        gates=evaluate_gates(spec, metrics),
    )
