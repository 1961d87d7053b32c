"""Batch fan-out (over bases, over fact chunks) and the JUnit report, without a server."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from modelsurgery.client.batch import over_bases, over_fact_sets, read_facts, request_id
from modelsurgery.client.junit import job_report
from modelsurgery.editing import registry
from modelsurgery.editing.registry import Method, MethodConfig, load_builtin_methods
from modelsurgery.proto.spec import SpecError, parse_spec
from modelsurgery.v1 import jobs_pb2


class FactsConfig(MethodConfig):
    method: str = "facts_probe"
    facts: list[dict]


@pytest.fixture
def facts_method(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in method taking ``facts``, registered for one test only."""
    load_builtin_methods()
    monkeypatch.setitem(registry._METHODS, "facts_probe", Method("facts_probe", FactsConfig, None))


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


def test_junit_report_has_a_case_per_gate() -> None:
    job = jobs_pb2.Job(
        id="job-1",
        state=jobs_pb2.JOB_STATE_FAILED,
        error="gates failed",
        gates=[
            jobs_pb2.GateResult(
                metric="efficacy", condition=">= 0.9", value=0.95, has_value=True, passed=True
            ),
            jobs_pb2.GateResult(
                metric="locality", condition=">= 0.9", value=0.5, has_value=True, passed=False
            ),
        ],
    )
    suite = job_report(job, "patch").getroot()
    assert (suite.get("tests"), suite.get("failures")) == ("3", "1")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert cases["gate efficacy"].find("failure") is None
    assert "0.5" in cases["gate locality"].find("failure").get("message")
    assert cases["job"].find("failure") is None
    cancelled = jobs_pb2.Job(id="job-2", state=jobs_pb2.JOB_STATE_CANCELLED)
    root = ET.fromstring(ET.tostring(job_report(cancelled, "patch").getroot()))
    assert root.find("testcase/failure") is not None
