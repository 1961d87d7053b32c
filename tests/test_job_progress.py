"""A job's events on a terminal (a bar with an ETA per stage) and in a CI log (plain lines)."""

from __future__ import annotations

import io

from google.protobuf import struct_pb2
from rich.console import Console

from modelsurgery.client.cli_common import UNWRAPPED, out
from modelsurgery.client.job_progress import JobProgress
from modelsurgery.v1 import jobs_pb2


def event(seq: int, message: str, **fields: object) -> jobs_pb2.JobEvent:
    values = struct_pb2.Struct()
    values.update(fields)
    return jobs_pb2.JobEvent(seq=seq, message=message, fields=values)


EVENTS = [
    event(1, "loading base model", base="tiny"),
    event(2, "v* targets", operation=0, step=3, total=10),
    event(3, "v* targets", operation=0, step=7, total=10),
    event(4, "writing version", tensors=2),
]


def shown(terminal: bool, quiet: bool = False) -> str:
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=terminal, width=120, color_system=None)
    with JobProgress(console, quiet=quiet) as progress:
        for e in EVENTS:
            progress(e)
    return stream.getvalue()


def test_a_terminal_shows_a_bar_with_an_eta_per_stage() -> None:
    text = shown(terminal=True)
    assert "op0 v* targets" in text and "7/10" in text and "eta" in text
    assert "━" in text  # the bar
    assert "loading base model" in text and "writing version" in text
    assert "step=" not in text


def test_a_ci_log_gets_one_plain_line_per_event() -> None:
    lines = shown(terminal=False).splitlines()
    assert lines[1].split() == ["2", "v*", "targets", "operation=0", "step=3", "total=10"]
    assert len(lines) == 4 and "━" not in "".join(lines)


def test_json_output_gets_no_progress_at_all() -> None:
    assert shown(terminal=True, quiet=True).strip() == ""


def test_output_to_a_pipe_is_not_wrapped_at_80_columns(monkeypatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    assert not out.is_terminal and out.width == UNWRAPPED
    monkeypatch.setenv("COLUMNS", "80")
    assert out.width == 80
