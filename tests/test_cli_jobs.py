"""The CLI's job commands as CI runs them, against the real JobService in this process (an
engine that never starts a job, so a job stays queued until cancelled): `jobs watch` exits
with the job's outcome, `jobs list/get --json` carry the base, times and attempts, `batch`
reports every item and exits with the worst outcome, and output to a pipe is not wrapped."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import read_junit
from junitparser import Error, Failure, Skipped
from security.service_under_test import Running, running_service
from test_client_contract import played_server
from typer.testing import CliRunner

from modelsurgery.client.cli import app
from modelsurgery.client.cli_common import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_OK,
    worst_exit,
)
from modelsurgery.v1 import jobs_pb2

MASK = [{"method": "mask_heads", "heads": ["0.1"]}]


@pytest.fixture
def service(tmp_path: Path, tiny_llama, tiny_tokenizer) -> Iterator[Running]:
    with running_service(tmp_path / "home", tiny_llama, tiny_tokenizer) as running:
        yield running


def cli(running_or_address: Running | str, *args: str) -> tuple[int, str, str]:
    address = getattr(running_or_address, "address", running_or_address)
    result = CliRunner().invoke(app, [*args, "--server", address])
    return result.exit_code, result.stdout, result.stderr


def spec_file(folder: Path, base: str) -> Path:
    path = folder / "patch.yaml"
    path.write_text(f"base: {base}\noperations:\n  - method: mask_heads\n    heads: ['0.1']\n")
    return path


@pytest.mark.parametrize(
    ("state", "exit_code"),
    [
        (jobs_pb2.JOB_STATE_SUCCEEDED, EXIT_OK),
        (jobs_pb2.JOB_STATE_FAILED, EXIT_FAILED),
        (jobs_pb2.JOB_STATE_CANCELLED, EXIT_CANCELLED),
    ],
)
def test_watch_exits_with_the_job_outcome(state: int, exit_code: int) -> None:
    with played_server(state) as (_, address, _):
        assert cli(address, "jobs", "watch", "job-1")[0] == exit_code
        code, stdout, _ = cli(address, "jobs", "watch", "job-1", "--json")
    assert code == exit_code
    events = [json.loads(line) for line in stdout.splitlines()]
    assert [e["seq"] for e in events] == [1, 2]  # integers, not protobuf's int64 strings


def test_watch_of_a_cancelled_job_on_the_real_service_exits_3(service: Running) -> None:
    with service.client() as client:
        job = client.submit({"base": service.version, "operations": MASK})
        client.cancel(job.id)
    code, stdout, _ = cli(service, "jobs", "watch", job.id, "--json")
    assert code == EXIT_CANCELLED
    assert json.loads(stdout.splitlines()[-1])["state"] == "CANCELLED"


def test_jobs_json_carries_base_times_and_attempts(service: Running) -> None:
    with service.client() as client:
        job = client.submit({"base": service.version, "operations": MASK})
        client.cancel(job.id)
    code, stdout, _ = cli(service, "jobs", "get", job.id, "--json")
    shown = json.loads(stdout)
    assert code == 0
    assert shown["base"] == shown["base_version"] == service.version
    assert shown["methods"] == ["mask_heads"] and shown["attempts"] == 0
    assert shown["created"].endswith("Z") and shown["finished"].endswith("Z")
    assert shown["started"] is None
    code, stdout, _ = cli(service, "jobs", "list", "--json")
    assert code == 0 and json.loads(stdout) == [shown]


def batch(service: Running, spec: Path, *args: str) -> tuple[int, list[dict], str]:
    code, stdout, stderr = cli(service, "batch", str(spec), *args, "--json")
    return code, json.loads(stdout), stderr


def test_batch_reports_every_item_and_exits_with_the_worst(
    service: Running, tmp_path: Path
) -> None:
    """One base the server refuses no longer hides the job that ran on the other."""
    spec = spec_file(tmp_path, service.version)
    report = tmp_path / "batch.xml"
    args = ("--base", service.version, "--base", "no-such-model", "--timeout", "1")
    code, items, _ = batch(service, spec, *args, "--junit", str(report))
    assert code == EXIT_INVALID
    assert [(i["label"], i["outcome"], i["exit_code"]) for i in items] == [
        (service.version, "TIMEOUT", 5),
        ("no-such-model", "REFUSED", EXIT_INVALID),
    ]
    assert items[0]["job_id"].startswith("job-") and items[0]["state"] is None
    assert items[1]["field"] == "spec.base" and items[1]["job_id"] is None
    assert items[1]["state"] is None  # no job: the refusal is its outcome
    cases = list(read_junit(report))
    assert [c.name for c in cases] == [service.version, "no-such-model"]
    assert isinstance(cases[0].result[0], Error) and isinstance(cases[1].result[0], Failure)


def test_batch_validates_every_item_before_submitting_any(service: Running, tmp_path: Path) -> None:
    spec = spec_file(tmp_path, service.version)
    code, items, _ = batch(service, spec, "--base", service.version, "--base", " ")
    assert code == EXIT_INVALID
    assert [i["outcome"] for i in items] == ["SKIPPED", "REFUSED"]
    assert items[1]["field"] == "spec.base"
    with service.client() as client:
        assert list(client.list_jobs()) == []
    report = tmp_path / "refused.xml"
    batch(service, spec, "--base", service.version, "--base", " ", "--junit", str(report))
    assert [type(c.result[0]) for c in read_junit(report)] == [Skipped, Failure]


def test_a_batch_table_in_a_ci_log_is_not_wrapped(service: Running, tmp_path: Path) -> None:
    """Written to a pipe, each item is one line however long its error."""
    spec = spec_file(tmp_path, service.version)
    long_name = "an-absent-model-" + "x" * 90
    code, stdout, _ = cli(service, "batch", str(spec), "--base", long_name, "--base", "other")
    assert code == EXIT_INVALID
    rows = [line for line in stdout.splitlines() if long_name in line]
    assert len(rows) == 1 and "REFUSED" in rows[0] and "spec.base" in rows[0]
    assert len(rows[0]) > 120


def test_the_worst_outcome_decides_the_exit_code() -> None:
    assert worst_exit([0, 3, 1]) == 1
    assert worst_exit([1, 5]) == 5
    assert worst_exit([5, 2, 1]) == 2
    assert worst_exit([2, 4]) == 4
    assert worst_exit([]) == 0


def test_a_batch_refused_as_a_whole_still_writes_its_report(
    service: Running, tmp_path: Path
) -> None:
    spec = spec_file(tmp_path, service.version)
    report = tmp_path / "whole.xml"
    code, stdout, _ = cli(service, "batch", str(spec), "--json", "--junit", str(report))
    assert code == EXIT_INVALID and json.loads(stdout)["field"] == "batch"
    (case,) = read_junit(report)
    assert case.name == "batch" and isinstance(case.result[0], Failure)
