"""JUnit XML for ``apply --junit``: a case per gate, so CI systems show each gate natively, and a
``job`` case, written whatever the outcome (also when no job ran or the wait broke off); for
``batch --junit``, a case per item."""

from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from modelsurgery.proto.job_state import TERMINAL_STATES, JobState
from modelsurgery.v1 import jobs_pb2

# What XML 1.0 cannot hold, not even escaped (ANSI colour codes, NUL ...): ElementTree writes
# it as it is and a CI system's parser then rejects the whole report.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(value: str) -> str:
    """``value`` with each character XML cannot carry replaced by U+FFFD."""
    return _NOT_XML.sub("\ufffd", value)


def _state(job: jobs_pb2.Job) -> str:
    """The job's state as reports spell it; ``UNSPECIFIED`` for a job apply never heard the
    state of, which the report must still show rather than fail on."""
    return JobState.from_proto(job.state) if job.state else "UNSPECIFIED"


@dataclass(frozen=True)
class Problem:
    """Why apply ended without the job's own verdict. ``failure``: the request was refused
    (e.g. an invalid spec); ``error``: the run broke off (server unreachable, timeout);
    ``skipped``: a batch item not run because another was invalid."""

    kind: Literal["failure", "error", "skipped"]
    type: str
    message: str


def job_report(
    job: jobs_pb2.Job | None,
    suite_name: str,
    *,
    problem: Problem | None = None,
    started: datetime | None = None,
    seconds: float = 0.0,
) -> ET.ElementTree:
    """A suite with a case per gate (a failure when it failed) and a ``job`` case that fails
    when the job failed or was cancelled, or carries ``problem`` when apply stopped early."""
    started = started or datetime.now(UTC)
    suite = ET.Element(
        "testsuite",
        name=suite_name,
        timestamp=started.isoformat(timespec="seconds"),
        time=f"{seconds:.3f}",
    )
    if job is not None:
        properties = ET.SubElement(suite, "properties")
        for name, value in (
            ("job_id", job.id),
            ("state", _state(job)),
            ("version_id", job.version_id),
            ("previous_attempt", job.previous_attempt),
        ):
            if value:
                ET.SubElement(properties, "property", name=name, value=xml_text(value))
        for gate in job.gates:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=suite_name,
                name=xml_text(f"gate {gate.metric}"),
                time="0",
            )
            value = f"{gate.value:.6g}" if gate.has_value else "not measured"
            text = xml_text(f"{gate.metric} = {value}, needs {gate.condition}")
            ET.SubElement(case, "system-out").text = text
            if not gate.passed:
                ET.SubElement(case, "failure", message=text, type="gate")
    job_case = ET.SubElement(
        suite, "testcase", classname=suite_name, name="job", time=f"{seconds:.3f}"
    )
    if job is not None:
        ET.SubElement(job_case, "system-out").text = f"job {job.id}: {_state(job)}" + (
            f", version {job.version_id}" if job.version_id else ""
        )
    if problem is not None:
        ET.SubElement(job_case, problem.kind, message=xml_text(problem.message), type=problem.type)
    elif job is not None and (state := _state(job)) != JobState.SUCCEEDED:
        message = xml_text(f"job ended {state}" + (f": {job.error}" if job.error else ""))
        ET.SubElement(job_case, "failure", message=message, type=state)
    return _counted(suite)


def _counted(suite: ET.Element) -> ET.ElementTree:
    """The suite with its totals of tests, failures and errors set."""
    cases = list(suite.iter("testcase"))
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(sum(c.find("failure") is not None for c in cases)))
    suite.set("errors", str(sum(c.find("error") is not None for c in cases)))
    return ET.ElementTree(suite)


@dataclass(frozen=True)
class ItemCase:
    """One batch item as a test case: its outcome line and what failed it (None: passed)."""

    name: str
    summary: str
    problem: Problem | None


def batch_report(
    cases: list[ItemCase], suite_name: str, *, started: datetime, seconds: float
) -> ET.ElementTree:
    """A suite with a case per batch item, so a CI system shows every item's outcome."""
    suite = ET.Element(
        "testsuite",
        name=suite_name,
        timestamp=started.isoformat(timespec="seconds"),
        time=f"{seconds:.3f}",
    )
    for item in cases:
        case = ET.SubElement(suite, "testcase", classname=suite_name, name=xml_text(item.name))
        ET.SubElement(case, "system-out").text = xml_text(item.summary)
        if item.problem is not None:
            ET.SubElement(
                case,
                item.problem.kind,
                message=xml_text(item.problem.message),
                type=item.problem.type,
            )
    return _counted(suite)


def write_report(tree: ET.ElementTree, path: Path) -> None:
    ET.indent(tree)
    path.parent.mkdir(parents=True, exist_ok=True)
    tree.write(path, encoding="utf-8", xml_declaration=True)


@dataclass
class ApplyReport:
    """What one ``apply`` learned, for its JUnit file: started when apply starts, the job as
    last seen and the problem that stopped it (if any) filled in on the way."""

    suite_name: str
    job: jobs_pb2.Job | None = None
    problem: Problem | None = None
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    _clock: float = field(default_factory=time.monotonic)

    def write(self, path: Path) -> None:
        """Write the report; apply stopping before the job ended with nothing recorded (an
        interrupt, a crash) is an error too, so CI never reads a missing verdict as a pass."""
        problem = self.problem
        if problem is None and (self.job is None or _state(self.job) not in TERMINAL_STATES):
            message = (
                f"apply stopped before job {self.job.id} ended"
                if self.job is not None
                else "apply stopped before it submitted the job"
            )
            problem = Problem("error", "interrupted", message)
        tree = job_report(
            self.job,
            self.suite_name,
            problem=problem,
            started=self.started,
            seconds=time.monotonic() - self._clock,
        )
        write_report(tree, path)
