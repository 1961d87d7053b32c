"""CLI output escapes markup (issue 17): a gate named ``[/oops]`` or a job error holding
``[bold]`` crashed ``jobs get`` and ``apply --wait``; now every server- or user-given text is
printed as written, in lines, tables and JUnit reports."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import build_tiny_tokenizer, tiny_model
from google.protobuf import struct_pb2
from rich.table import Table
from typer.testing import CliRunner

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.client.cli import _print_job, app
from modelsurgery.client.cli_common import console, out, plain_row
from modelsurgery.client.job_progress import JobProgress
from modelsurgery.client.junit import job_report
from modelsurgery.v1 import jobs_pb2

ERROR = "ValueError: [bold]not bold[/bold] [/oops] :warning:"


def _failed_job() -> jobs_pb2.Job:
    return jobs_pb2.Job(
        id="job-0123456789abcdef",
        state=jobs_pb2.JOB_STATE_FAILED,
        error=ERROR,
        metrics={"[/oops]": 1.5},
        gates=[
            jobs_pb2.GateResult(
                metric="[/oops]", condition="<= 1", value=1.5, has_value=True, passed=False
            )
        ],
    )


def test_jobs_get_prints_markup_in_errors_gates_and_metrics_as_written() -> None:
    """``jobs get`` and the end of ``apply --wait`` print a job with ``_print_job``."""
    with out.capture() as captured:
        _print_job(_failed_job())
    text = captured.get()
    assert ERROR in text
    assert text.count("[/oops]") == 3  # the error, the metrics table, the gates table
    assert "FAIL" in text


def test_watch_and_apply_wait_print_event_messages_and_fields_as_written() -> None:
    fields = struct_pb2.Struct()
    fields.update({"[bold]": "[/oops]"})
    event = jobs_pb2.JobEvent(seq=7, message="step [/oops] :warning:", fields=fields)
    with console.capture() as captured:
        JobProgress(console)(event)
    assert "step [/oops] :warning: [bold]=[/oops]" in captured.get()


def test_plain_rows_keep_brackets() -> None:
    table = Table("job", "error")
    plain_row(table, "job-1", "[red]x[/oops]")
    with out.capture() as captured:
        out.print(table)
    assert "[red]x[/oops]" in captured.get()


def test_versions_list_and_show_print_references_and_methods_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MODELSURGERY_SERVER", raising=False)
    root = tmp_path / "store"
    store = CheckpointStore(root)
    base = store.import_model(tiny_model("llama"), build_tiny_tokenizer(), reference="[/oops]")
    child = store.commit(base.id, {}, operations=[{"method": "[bold]m"}])
    runner = CliRunner()
    listed = runner.invoke(app, ["versions", "list", "--store", str(root)])
    assert listed.exit_code == 0, listed.output
    assert "[/oops]" in listed.stdout and "[bold]m" in listed.stdout
    shown = runner.invoke(app, ["versions", "show", child.id, "--store", str(root)])
    assert shown.exit_code == 0, shown.output
    assert "(base [/oops])" in shown.stdout and "'[bold]m'" in shown.stdout


def test_junit_report_parses_whatever_the_error_holds() -> None:
    job = _failed_job()
    job.error = "\x1b[31mboom\x1b[0m <&> \x00"
    report = ET.fromstring(ET.tostring(job_report(job, "suite").getroot()))
    failures = [f.get("message") for f in report.iter("failure")]
    assert "job ended FAILED: \ufffd[31mboom\ufffd[0m <&> \ufffd" in failures
    assert any(case.get("name") == "gate [/oops]" for case in report.iter("testcase"))
