"""Pieces every CLI command uses: options, output (rich or --json), errors, the local store."""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import grpc
import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column, Table
from rich.text import Text

from modelsurgery.client.connection import SERVER_ENV, TOKEN_ENV
from modelsurgery.client.errors import JobFailed, ModelSurgeryError, WaitTimeout
from modelsurgery.client.junit import Problem
from modelsurgery.client.sdk import Client
from modelsurgery.proto.export_record import HookedExportWarning
from modelsurgery.proto.job_state import PROTO_PREFIX, JobState
from modelsurgery.proto.spec import SpecError
from modelsurgery.v1 import jobs_pb2

# Width of a line written to a file or pipe: as long as its text (a table as wide as its cells).
UNWRAPPED = 100_000


class _Console(Console):
    """A console that wraps only on a terminal: written to a CI log or a pipe (without COLUMNS
    set), a line is as long as its text, where rich would cut it at 80 columns. Decided at
    each print, as the stream may change after import (a test runner's capture)."""

    def _size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)  # type: ignore[attr-defined]
        if self._width is None and not self.is_terminal and not os.environ.get("COLUMNS"):
            return ConsoleDimensions(UNWRAPPED, size.height)
        return size

    size = property(_size, Console.size.fset)  # type: ignore[attr-defined]


# Text from servers and users is printed through ``escape``, ``Text`` or ``plain_row``, never
# as markup; emoji codes (``:warning:``) in it stay as written too.
console = _Console(stderr=True, emoji=False)
out = _Console(highlight=False, emoji=False)

# Exit codes, the contract CI pipelines rely on (README "Using it", `apply --help`).
EXIT_OK = 0
EXIT_FAILED = 1  # the job failed, or one of its gates did
EXIT_INVALID = 2  # invalid spec or usage: the request was refused, retrying will not help
EXIT_CANCELLED = 3
EXIT_INFRASTRUCTURE = 4  # server unreachable, or an error on its side
EXIT_TIMEOUT = 5  # --timeout ran out before the job ended
# Which of several outcomes a command that runs many jobs (batch) exits with: the worst first.
# A broken run outweighs a refusal, which outweighs a timeout, a failed job, a cancelled one.
WORST_FIRST = (
    EXIT_INFRASTRUCTURE,
    EXIT_INVALID,
    EXIT_TIMEOUT,
    EXIT_FAILED,
    EXIT_CANCELLED,
    EXIT_OK,
)
_STATE_EXIT_CODES = {JobState.SUCCEEDED: EXIT_OK, JobState.CANCELLED: EXIT_CANCELLED}
INFRASTRUCTURE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
    }
)
# Top-level modules of the ``server`` extra. Commands that run the ML stack in this process
# (serve, apply --local, the local store, heads plot) import it inside; without the extra they
# end with the install line instead of a traceback.
SERVER_MODULES = frozenset(
    {
        "torch",
        "transformers",
        "safetensors",
        "gguf",
        "peft",
        "accelerate",
        "ray",
        "filelock",
        "prometheus_client",
        "matplotlib",
        "grpc_health",
        "grpc_reflection",
    }
)
SERVER_EXTRA = "pip install 'modelsurgery[server]'"

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
ServerOption = Annotated[
    str | None,
    typer.Option(
        "--server",
        envvar=SERVER_ENV,
        help="host:port of a modelsurgery server. Without it, versions, alias, import and "
        "generate work on the local store, and the other commands connect to 127.0.0.1:50051.",
    ),
]
TokenOption = Annotated[
    str | None, typer.Option("--token", envvar=TOKEN_ENV, help="Bearer token for the server.")
]
CaOption = Annotated[
    Path | None, typer.Option("--tls-ca", help="CA certificate: connect with TLS.")
]
StoreOption = Annotated[
    Path | None,
    typer.Option(
        "--store",
        help="Local store root (default $MODELSURGERY_HOME/store or ~/.modelsurgery/store).",
    ),
]


# Version ids ("v" + 20 hex) and job ids ("job-" + 16 hex): a table column never cuts them.
ID_WIDTH = 21


def id_column(header: str) -> Column:
    return Column(header, no_wrap=True, min_width=ID_WIDTH)


def plain_row(table: Table, *cells: str | Text) -> None:
    """A row whose text cells print as written: a job, gate or metric name such as ``[/oops]``
    is not read as rich markup (a plain ``add_row`` would, and fail on it)."""
    table.add_row(*(Text(cell) if isinstance(cell, str) else cell for cell in cells))


def _short_states(value: Any) -> Any:
    """Job states spelled as everywhere else in the CLI (``QUEUED``, not ``JOB_STATE_QUEUED``)."""
    if isinstance(value, dict):
        return {k: _short_states(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_short_states(v) for v in value]
    if isinstance(value, str) and value.startswith(PROTO_PREFIX):
        return value.removeprefix(PROTO_PREFIX)
    return value


def to_data(value: Any) -> Any:
    """Protobuf messages, pydantic models and dataclasses as plain JSON data."""
    if isinstance(value, Message):
        return _short_states(
            json_format.MessageToDict(
                value, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
        )
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [to_data(v) for v in value]
    if isinstance(value, dict):
        return {k: to_data(v) for k, v in value.items()}
    if hasattr(value, "__dataclass_fields__"):
        return {k: to_data(getattr(value, k)) for k in value.__dataclass_fields__}
    return value


def emit_json(value: Any) -> None:
    out.print_json(json.dumps(to_data(value), default=str))


def whole_numbers(value: Any) -> Any:
    """Floats that are whole numbers as integers, at any depth: a protobuf Struct holds every
    number as a double, so a step 3 would be written ``3.0``."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [whole_numbers(v) for v in value]
    return value


def event_data(event: jobs_pb2.JobEvent) -> dict[str, Any]:
    """A job event as JSON data: ``seq`` and the fields' whole numbers as integers (protobuf's
    JSON writes an int64 as a string)."""
    return {
        "job_id": event.job_id,
        "seq": event.seq,
        "time": event.time.ToJsonString() if event.HasField("time") else None,
        "kind": event.kind,
        "state": JobState.from_proto(event.state) if event.state else None,
        "message": event.message,
        "fields": whole_numbers(dict(sorted(json_format.MessageToDict(event.fields).items()))),
    }


def emit_json_line(value: Any) -> None:
    """One compact JSON object per line (JSON Lines), for streams a reader parses line by line."""
    sys.stdout.write(json.dumps(to_data(value), default=str, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def fail(message: str, exit_code: int = 1, *, as_json: bool = False, **fields: Any) -> NoReturn:
    if as_json:
        emit_json({"error": message, **fields})
    else:
        console.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(exit_code)


@dataclass(frozen=True)
class Reported:
    """An error as a command reports it: exit code, message, gRPC status name and field."""

    exit_code: int
    message: str
    code: str | None = None
    field: str | None = None


def classify(exc: Exception) -> Reported | None:
    """How an exception ends a command (None: not an error commands report, e.g. a bug)."""
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in SERVER_MODULES:
        return Reported(
            EXIT_INVALID,
            f"this command runs models in this process and needs the server extra (no module "
            f"named {exc.name!r}): {SERVER_EXTRA}; commands given --server need only the client",
        )
    if isinstance(exc, WaitTimeout):
        return Reported(EXIT_TIMEOUT, exc.message, exc.code.name, exc.field)
    if isinstance(exc, ModelSurgeryError):
        exit_code = EXIT_INFRASTRUCTURE if exc.code in INFRASTRUCTURE_CODES else EXIT_INVALID
        return Reported(exit_code, exc.message, exc.code.name, exc.field)
    if isinstance(exc, SpecError):
        return Reported(EXIT_INVALID, str(exc), grpc.StatusCode.INVALID_ARGUMENT.name, exc.field)
    if isinstance(exc, (*_store_errors(), FileNotFoundError, ValueError)):
        return Reported(EXIT_INVALID, str(exc.args[0] if exc.args else exc))
    if isinstance(exc, JobFailed):
        cancelled = exc.state is JobState.CANCELLED
        return Reported(EXIT_CANCELLED if cancelled else EXIT_FAILED, str(exc))
    return None


def state_exit_code(state: JobState) -> int:
    """The exit code of a job that ended in ``state`` (apply --wait, jobs watch, batch)."""
    return _STATE_EXIT_CODES.get(state, EXIT_FAILED)


def worst_exit(codes: Iterable[int]) -> int:
    """The exit code of several outcomes: the worst of them (``WORST_FIRST``), 0 for none."""
    return min(codes, key=WORST_FIRST.index, default=EXIT_OK)


def junit_problem(reported: Reported) -> Problem:
    """Infrastructure errors and timeouts are JUnit errors (the run broke off); a refused
    request is a failure of the patch itself."""
    broke_off = reported.exit_code in (EXIT_INFRASTRUCTURE, EXIT_TIMEOUT)
    named = reported.field is None or reported.field in reported.message
    field = "" if named else f" (field {reported.field})"
    return Problem(
        "error" if broke_off else "failure",
        reported.code or "error",
        f"{reported.message}{field}",
    )


def _store_errors() -> tuple[type[Exception], ...]:
    """The local store's lookup and alias errors; only a command that imported the store (and
    with it the ML stack) can raise them, so they are not imported for the others."""
    store = sys.modules.get("modelsurgery.checkpoints")
    return (store.VersionNotFoundError, store.AliasConflictError) if store else ()


@contextmanager
def reported_errors(
    as_json: bool, on_error: Callable[[Reported], None] | None = None
) -> Iterator[None]:
    """Typed SDK and store errors become one clear line (or JSON) and their exit code;
    ``on_error`` sees each one first (``apply --junit`` records it)."""
    try:
        yield
    except Exception as exc:
        reported = classify(exc)
        if reported is None:
            raise
        if on_error is not None:
            on_error(reported)
        fields = {"code": reported.code, "field": reported.field} if reported.code else {}
        fail(reported.message, reported.exit_code, as_json=as_json, **fields)


def warn(message: str) -> None:
    """One line on stderr, unwrapped (a log or CI reader greps it)."""
    console.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)


@contextmanager
def export_warnings() -> Iterator[None]:
    """An exported or downloaded version whose edit lives in hooks is reported as one
    ``warning:`` line on stderr rather than a Python warning dump; other warnings pass on."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", HookedExportWarning)
            yield
    finally:
        for record in caught:
            if issubclass(record.category, HookedExportWarning):
                warn(str(record.message))
            else:
                warnings.warn_explicit(
                    record.message, record.category, record.filename, record.lineno
                )


def connect(server: str | None, token: str | None, tls_ca: Path | None = None) -> Client:
    return Client(server, token=token, root_certificates=tls_ca)


def local_store(root: Path | None) -> Any:
    from modelsurgery.checkpoints import CheckpointStore

    if root is None and os.environ.get("MODELSURGERY_HOME"):
        root = Path(os.environ["MODELSURGERY_HOME"]) / "store"
    return CheckpointStore(root)


@contextmanager
def count_progress(description: str, enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """A progress bar fed by ``progress(done, total)`` callbacks; silent when disabled."""
    if not enabled or not sys.stderr.isatty():
        yield lambda done, total: None
        return
    with Progress(
        TextColumn(description),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        console=console,
    ) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@contextmanager
def byte_progress(description: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    if not enabled or not sys.stderr.isatty():
        yield lambda n: None
        return
    with Progress(
        TextColumn(description),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(description, total=None)
        yield lambda n: bar.advance(task, n)
