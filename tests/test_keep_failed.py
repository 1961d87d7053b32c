"""``keep_failed: true`` (issue 31): a job that fails a gate keeps its candidate for inspection,
a version with no alias whose manifest and model card say which gates it failed; the job still
FAILS and names the kept version, also when a restarted server settles it from the store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.proto.job_state import JobState
from modelsurgery.proto.spec import parse_spec, spec_from_proto
from modelsurgery.server.auth import ANONYMOUS
from modelsurgery.server.executor import WorkerSettings
from modelsurgery.server.outcome import JobOutcome, settle_published
from modelsurgery.server.permissions import AliasPolicy
from modelsurgery.server.worker import SurgeryWorker


def spec(model: Path, **extra: Any) -> dict[str, Any]:
    return {
        "base": str(model),
        "operations": [{"method": "mask_heads", "heads": ["0.1"]}],
        "gates": {"parameter_ratio": "< 0.5"},
        "alias": "prod",
        **extra,
    }


def run(tmp_path: Path, job_spec: dict[str, Any]) -> tuple[JobOutcome, CheckpointStore]:
    settings = WorkerSettings(store_root=tmp_path / "store", cache_dir=tmp_path / "cache")
    outcome = list(SurgeryWorker(settings, num_threads=1).run_job("job-1", job_spec))[-1]
    assert isinstance(outcome, JobOutcome)
    return outcome, CheckpointStore(tmp_path / "store")


def test_a_failed_gate_publishes_nothing_by_default(tmp_path: Path, tiny_model_dir: Path) -> None:
    outcome, store = run(tmp_path, spec(tiny_model_dir))
    assert outcome.state == JobState.FAILED and outcome.version_id is None
    assert [m.operations for m in store.list_versions()] == [[]]  # the imported base only


def test_keep_failed_keeps_the_candidate_marked_and_without_alias(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    job_spec = spec(tiny_model_dir, keep_failed=True)
    outcome, store = run(tmp_path, job_spec)
    assert outcome.state == JobState.FAILED and outcome.version_id
    assert outcome.error.startswith("gates failed: parameter_ratio=1.0 (needs < 0.5)")
    assert f"candidate kept as version {outcome.version_id}" in outcome.error
    kept = store.get(outcome.version_id)
    assert kept.operations[0]["method"] == "mask_heads"
    assert [(g["metric"], g["passed"]) for g in kept.failed_gates] == [("parameter_ratio", False)]
    assert store.get_alias("prod") is None
    folder = store.export(kept.id, tmp_path / "export")
    card = (folder / "README.md").read_text()
    assert "## Failed its gates" in card and "failed-gates" in card
    assert "| parameter_ratio | < 0.5 | 1 | FAIL |" in card
    # A server that died after keeping it settles the job from the store the same way.
    settled = settle_published(parse_spec(job_spec), kept, store, ANONYMOUS, AliasPolicy())
    assert (settled.state, settled.version_id) == (JobState.FAILED, kept.id)
    assert settled.error == outcome.error and store.get_alias("prod") is None


def test_keep_failed_crosses_the_api() -> None:
    data = {"base": "x", "operations": [{"method": "mask_heads", "heads": ["0.1"]}]}
    kept = parse_spec({**data, "keep_failed": True})
    assert spec_from_proto(kept.to_proto()).keep_failed
    assert not spec_from_proto(parse_spec(data).to_proto()).keep_failed
