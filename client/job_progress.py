"""A job's events as they arrive: a progress bar with an ETA per stage on a terminal, plain lines
(one per event, never rewritten) in a CI log or a pipe.

A stage is an event carrying ``step`` and ``total`` (second-moment statistics, v* or fast
targets, facts written, training steps, pruned layers): each stage of each operation gets its
own bar, fed by the events the worker already sends. Other events print as lines above the bars.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from google.protobuf import json_format
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from modelsurgery.client.cli_common import whole_numbers
from modelsurgery.v1 import jobs_pb2


def event_line(event: jobs_pb2.JobEvent, fields: dict[str, Any]) -> str:
    """``seq message key=value ...`` as markup (the event's own text escaped), the fields in
    name order: a Struct's map has none of its own, and a log reader wants one."""
    extra = " ".join(f"{k}={v}" for k, v in sorted(fields.items()))
    return f"[dim]{event.seq:>4}[/dim] {escape(event.message)} [dim]{escape(extra)}[/dim]"


def stage(fields: dict[str, Any]) -> tuple[int, int] | None:
    """(step, total) of an event that reports a stage's progress, else None."""
    step, total = fields.get("step"), fields.get("total")
    if isinstance(step, int) and isinstance(total, int) and total > 0:
        return step, total
    return None


class JobProgress:
    """Callable on each event (``Client.wait(progress=...)``); use it as a context manager so
    the bars stop when the job ends."""

    def __init__(self, console: Console, *, quiet: bool = False) -> None:
        """``quiet``: show nothing (a command printing JSON instead)."""
        self.console = console
        self.quiet = quiet
        self._bars: Progress | None = None
        self._tasks: dict[tuple[Any, str], TaskID] = {}
        if console.is_terminal and not quiet:
            self._bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console,
            )

    def __enter__(self) -> JobProgress:
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bars is not None:
            self._bars.stop()

    def __call__(self, event: jobs_pb2.JobEvent) -> None:
        if self.quiet:
            return
        fields = whole_numbers(json_format.MessageToDict(event.fields))
        progress = stage(fields)
        if self._bars is None or progress is None:
            self.console.print(event_line(event, fields), soft_wrap=True)
            return
        step, total = progress
        key = (fields.get("operation"), event.message)
        task = self._tasks.get(key)
        if task is None:
            where = f"op{key[0]} " if key[0] is not None else ""
            task = self._tasks[key] = self._bars.add_task(
                escape(where + event.message), total=total
            )
        self._bars.update(task, completed=step, total=total)
