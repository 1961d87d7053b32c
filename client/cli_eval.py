"""``modelsurgery eval``: judge a stored version without making one, the way the job that made
it was judged (its stored suite and its lineage's, against its parent), or on a given suite."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from modelsurgery.client.cli_common import (
    CaOption,
    JsonOption,
    ServerOption,
    TokenOption,
    connect,
    emit_json,
    out,
    plain_row,
    reported_errors,
)


def suite_from_file(path: Path) -> dict[str, Any]:
    """A CounterFact-format JSON list of facts, a JSONL of ``{"stereo", "anti"}`` pairs, or a
    suite JSON with ``facts`` and/or ``pairs``."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return {"pairs": [json.loads(line) for line in text.splitlines() if line.strip()]}
    data = json.loads(text)
    return {"facts": data} if isinstance(data, list) else data


def register_eval_command(app: typer.Typer) -> None:
    @app.command("eval")
    def evaluate(
        ref: Annotated[str, typer.Argument(help="Version id or alias to judge.")],
        suite: Annotated[
            Path | None,
            typer.Option(
                help="Judge on this file instead of the stored suite: CounterFact JSON (facts) "
                "or JSONL of {stereo, anti} pairs.",
                exists=True,
                dir_okay=False,
            ),
        ] = None,
        against: Annotated[
            str | None, typer.Option(help="Reference version (default: REF's parent).")
        ] = None,
        perplexity: Annotated[
            bool, typer.Option("--perplexity", help="Also measure WikiText-2 perplexity.")
        ] = False,
        as_json: JsonOption = False,
        server: ServerOption = None,
        token: TokenOption = None,
        tls_ca: CaOption = None,
    ) -> None:
        """Judge REF against its parent (or --against) on its stored suite and every
        ancestor's, without making a version: the numbers its job reported (needs a server:
        --server / MODELSURGERY_SERVER)."""
        with reported_errors(as_json):
            given = suite_from_file(suite) if suite is not None else None
            with connect(server, token, tls_ca) as client:
                result = client.evaluate(ref, against=against, suite=given, perplexity=perplexity)
        metrics = dict(sorted(result.metrics.items()))
        if as_json:
            emit_json(
                {"version_id": result.version_id, "against": result.against, "metrics": metrics}
            )
            return
        title = Text(f"{result.version_id} against {result.against}")
        table = Table("metric", "value", title=title)
        for name, value in metrics.items():
            plain_row(table, name, f"{value:.6g}")
        out.print(table)
