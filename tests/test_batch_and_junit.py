"""Batch fan-out (over bases, over fact chunks) and the JUnit report of every apply outcome,
without a server."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
from conftest import read_junit
from junitparser import Error, Failure, TestSuite

from modelsurgery.client.batch import over_bases, over_fact_sets, read_facts, request_id
from modelsurgery.client.junit import ApplyReport, Problem
from modelsurgery.editing import registry
from modelsurgery.editing.registry import MethodConfig, load_builtin_methods
from modelsurgery.proto.spec import SpecError, parse_spec
from modelsurgery.v1 import jobs_pb2


class FactsConfig(MethodConfig):
    method: str = "facts_probe"
    facts: list[dict]


@pytest.fixture
def facts_method(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in method taking ``facts``, registered for one test only."""
    load_builtin_methods()
    monkeypatch.setitem(registry._CONFIGS, "facts_probe", FactsConfig)


MASK = {"base": "a", "operations": [{"method": "mask_heads", "heads": ["0.1"]}]}


def test_over_bases_keeps_operations() -> None:
    items = over_bases(parse_spec(MASK), ["m1", "m2", "m3"])
    assert [i.spec.base for i in items] == ["m1", "m2", "m3"]
    assert all(i.spec.operations == parse_spec(MASK).operations for i in items)
    assert len({request_id("b", i) for i in items}) == 3
    assert request_id("b", items[0]) == request_id("b", over_bases(parse_spec(MASK), ["m1"])[0])


@pytest.mark.usefixtures("facts_method")
def test_over_fact_sets_chunks_a_jsonl_file(tmp_path: Path) -> None:
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(7)))
    spec = parse_spec({"base": "a", "operations": [{"method": "facts_probe", "facts": []}]})
    items = over_fact_sets(spec, read_facts(path), per_job=3)
    assert [len(i.spec.operations[0].facts) for i in items] == [3, 3, 1]
    assert [i.label for i in items] == ["facts 0-2", "facts 3-5", "facts 6-6"]
    with pytest.raises(SpecError):
        over_fact_sets(parse_spec(MASK), read_facts(path), per_job=3)


def test_read_facts_reports_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "facts.jsonl"
    path.write_text('{"n": 1}\nnot json\n')
    with pytest.raises(SpecError, match="line 2"):
        list(read_facts(path))


def gate(metric: str, value: float, passed: bool) -> jobs_pb2.GateResult:
    return jobs_pb2.GateResult(
        metric=metric, condition=">= 0.9", value=value, has_value=True, passed=passed
    )


def written(report: ApplyReport, tmp_path: Path) -> TestSuite:
    path = tmp_path / "reports" / "junit.xml"
    report.write(path)
    return read_junit(path)


def test_junit_failed_gate_fails_its_case_and_the_job(tmp_path: Path) -> None:
    job = jobs_pb2.Job(
        id="job-1",
        state=jobs_pb2.JOB_STATE_FAILED,
        error="gates failed: locality",
        gates=[gate("efficacy", 0.95, True), gate("locality", 0.5, False)],
    )
    report = ApplyReport("patch", job=job)
    suite = written(report, tmp_path)
    assert (suite.name, suite.tests, suite.failures, suite.errors) == ("patch", 3, 2, 0)
    assert suite.time >= 0
    assert datetime.fromisoformat(suite.timestamp) == report.started.replace(microsecond=0)
    cases = {case.name: case for case in suite}
    assert list(cases) == ["gate efficacy", "gate locality", "job"]
    assert cases["gate efficacy"].is_passed
    (failure,) = cases["gate locality"].result
    assert isinstance(failure, Failure) and "locality = 0.5, needs >= 0.9" in failure.message
    (job_failure,) = cases["job"].result
    assert isinstance(job_failure, Failure)
    assert job_failure.message == "job ended FAILED: gates failed: locality"


def test_junit_succeeded_job_passes_and_names_its_attempts(tmp_path: Path) -> None:
    job = jobs_pb2.Job(
        id="job-2",
        state=jobs_pb2.JOB_STATE_SUCCEEDED,
        version_id="v-1",
        previous_attempt="job-1",
        gates=[gate("efficacy", 0.95, True)],
    )
    suite = written(ApplyReport("patch", job=job), tmp_path)
    assert (suite.tests, suite.failures, suite.errors) == (2, 0, 0)
    assert all(case.is_passed for case in suite)
    assert {p.name: p.value for p in suite.properties()} == {
        "job_id": "job-2",
        "state": "SUCCEEDED",
        "version_id": "v-1",
        "previous_attempt": "job-1",
    }


def test_junit_cancelled_job_fails(tmp_path: Path) -> None:
    job = jobs_pb2.Job(id="job-3", state=jobs_pb2.JOB_STATE_CANCELLED)
    suite = written(ApplyReport("patch", job=job), tmp_path)
    assert (suite.tests, suite.failures, suite.errors) == (1, 1, 0)
    (failure,) = next(iter(suite)).result
    assert (failure.type, failure.message) == ("CANCELLED", "job ended CANCELLED")


@pytest.mark.parametrize(
    ("job", "problem", "counts"),
    [
        (None, Problem("failure", "INVALID_ARGUMENT", "spec.base: no such model"), (1, 0)),
        (
            jobs_pb2.Job(id="job-4", state=jobs_pb2.JOB_STATE_QUEUED),
            Problem("error", "UNAVAILABLE", "server unreachable for 15 s"),
            (0, 1),
        ),
        (
            jobs_pb2.Job(id="job-5", state=jobs_pb2.JOB_STATE_RUNNING),
            Problem("error", "DEADLINE_EXCEEDED", "job job-5 did not end within 5 s"),
            (0, 1),
        ),
    ],
)
def test_junit_records_why_apply_stopped(
    tmp_path: Path, job: jobs_pb2.Job | None, problem: Problem, counts: tuple[int, int]
) -> None:
    suite = written(ApplyReport("patch", job=job, problem=problem), tmp_path)
    assert (suite.failures, suite.errors) == counts
    (case,) = suite
    (result,) = case.result
    assert isinstance(result, Failure if problem.kind == "failure" else Error)
    assert (result.type, result.message) == (problem.type, problem.message)


def test_junit_apply_stopped_with_nothing_recorded_is_an_error(tmp_path: Path) -> None:
    """An interrupt or a crash must not leave a report CI reads as a pass."""
    for job, message in [
        (None, "apply stopped before it submitted the job"),
        (jobs_pb2.Job(id="job-6"), "apply stopped before job job-6 ended"),
    ]:
        suite = written(ApplyReport("patch", job=job), tmp_path)
        (result,) = next(iter(suite)).result
        assert isinstance(result, Error) and result.message == message
        assert suite.errors == 1
