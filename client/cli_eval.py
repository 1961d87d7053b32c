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
from modelsurgery.v1 import checkpoints_pb2


def suite_from_file(path: Path) -> dict[str, Any]:
    """A CounterFact-format JSON list of facts, a JSONL of ``{"stereo", "anti"}`` pairs, or a
    suite JSON with ``facts`` and/or ``pairs``."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return {"pairs": [json.loads(line) for line in text.splitlines() if line.strip()]}
    data = json.loads(text)
    return {"facts": data} if isinstance(data, list) else data


def case_data(case: checkpoints_pb2.EvaluationCase) -> dict[str, Any]:
    """One judged fact or pair as JSON data, its figures by name."""
    return {
        "suite": case.suite,
        "index": case.index,
        "label": case.label or None,
        "passed": case.passed,
        "figures": dict(sorted(case.figures.items())),
    }


def print_cases(cases: list[dict[str, Any]]) -> None:
    """A row per case, failing ones marked, in suite order."""
    table = Table("suite", "case", "label", "result", "figures")
    for case in cases:
        figures = " ".join(f"{k}={v:.4g}" for k, v in case["figures"].items())
        verdict = Text("pass", style="green") if case["passed"] else Text("FAIL", style="red")
        plain_row(table, case["suite"], str(case["index"]), case["label"] or "-", verdict, figures)
    out.print(table)


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
        per_case: Annotated[
            bool,
            typer.Option(
                "--per-case",
                help="Also show each fact's and pair's own result, so a CI log shows which "
                "one broke.",
            ),
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
                result = client.evaluate(
                    ref, against=against, suite=given, perplexity=perplexity, per_case=per_case
                )
        metrics = dict(sorted(result.metrics.items()))
        cases = [case_data(case) for case in result.cases]
        if as_json:
            shown: dict[str, Any] = {
                "version_id": result.version_id,
                "against": result.against,
                "metrics": metrics,
            }
            emit_json({**shown, "cases": cases} if per_case else shown)
        else:
            # A line of its own: a table's title wraps at the table's width.
            out.print(Text(f"{result.version_id} against {result.against}"))
            table = Table("metric", "value")
            for name, value in metrics.items():
                plain_row(table, name, f"{value:.6g}")
            out.print(table)
            if per_case:
                print_cases(cases)
