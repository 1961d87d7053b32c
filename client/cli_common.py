"""Pieces every CLI command uses: options, output (rich or --json), errors, the local store."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from modelsurgery.client.connection import SERVER_ENV, TOKEN_ENV
from modelsurgery.client.errors import JobFailed, ModelSurgeryError
from modelsurgery.client.sdk import Client

console = Console(stderr=True)
out = Console(highlight=False)

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
ServerOption = Annotated[
    str | None,
    typer.Option(
        "--server",
        envvar=SERVER_ENV,
        help="host:port of a modelsurgery server; without it, work on the local store.",
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


def to_data(value: Any) -> Any:
    """Protobuf messages, pydantic models and dataclasses as plain JSON data."""
    if isinstance(value, Message):
        return json_format.MessageToDict(
            value, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
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


def fail(message: str, exit_code: int = 1, *, as_json: bool = False, **fields: Any) -> NoReturn:
    if as_json:
        emit_json({"error": message, **fields})
    else:
        console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(exit_code)


@contextmanager
def reported_errors(as_json: bool) -> Iterator[None]:
    """Typed SDK and store errors become one clear line (or JSON) and a non-zero exit."""
    from modelsurgery.checkpoints import AliasConflictError, VersionNotFoundError
    from modelsurgery.proto.spec import SpecError

    try:
        yield
    except ModelSurgeryError as exc:
        fail(exc.message, 2, as_json=as_json, code=exc.code.name, field=exc.field)
    except SpecError as exc:
        fail(str(exc), 2, as_json=as_json, code="INVALID_ARGUMENT", field=exc.field)
    except (VersionNotFoundError, AliasConflictError, FileNotFoundError, ValueError) as exc:
        fail(str(exc.args[0] if exc.args else exc), 2, as_json=as_json)
    except JobFailed as exc:
        fail(str(exc), 1, as_json=as_json)


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
