"""JUnit XML for a job: one test case per gate, so CI systems show each gate natively."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from modelsurgery.client.connection import STATE_NAMES
from modelsurgery.v1 import jobs_pb2


def job_report(job: jobs_pb2.Job, suite_name: str) -> ET.ElementTree:
    """A suite with a case per gate, plus a ``job`` case that fails when the job did not
    succeed for another reason (an error, cancellation) or never reached its gates."""
    suite = ET.Element("testsuite", name=suite_name)
    cases = 0
    failures = 0
    for gate in job.gates:
        case = ET.SubElement(suite, "testcase", classname=suite_name, name=f"gate {gate.metric}")
        value = f"{gate.value:.6g}" if gate.has_value else "not measured"
        ET.SubElement(case, "system-out").text = f"{gate.metric} = {value}, needs {gate.condition}"
        cases += 1
        if not gate.passed:
            failures += 1
            ET.SubElement(
                case, "failure", message=f"{gate.metric} = {value}, needs {gate.condition}"
            )
    job_case = ET.SubElement(suite, "testcase", classname=suite_name, name="job")
    state = STATE_NAMES[job.state]
    ET.SubElement(job_case, "system-out").text = f"job {job.id}: {state}" + (
        f", version {job.version_id}" if job.version_id else ""
    )
    cases += 1
    gate_failed = any(not g.passed for g in job.gates)
    if job.state != jobs_pb2.JOB_STATE_SUCCEEDED and not gate_failed:
        failures += 1
        ET.SubElement(job_case, "failure", message=f"job ended {state}: {job.error}")
    suite.set("tests", str(cases))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    return ET.ElementTree(suite)


def write_job_report(job: jobs_pb2.Job, path: Path, suite_name: str) -> None:
    tree = job_report(job, suite_name)
    ET.indent(tree)
    path.parent.mkdir(parents=True, exist_ok=True)
    tree.write(path, encoding="utf-8", xml_declaration=True)
