"""``modelsurgery concepts predict``: the concepts and label a concept_bottleneck version
predicts for texts, with ``--intervene`` after the user's corrections steer it, and with
``--explain`` the tokens that drive each concept."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from modelsurgery.client.cli_common import (
    EXIT_INVALID,
    CaOption,
    JsonOption,
    ServerOption,
    TokenOption,
    connect,
    emit_json_line,
    fail,
    out,
    plain_row,
    reported_errors,
)

concepts_app = typer.Typer(help="Concept bottleneck versions: predict and intervene.")


def read_texts_file(path: Path) -> tuple[list[str], list[dict[str, str] | None]]:
    """Texts and their corrections from JSON Lines ``{"text", "concepts"?}``."""
    texts: list[str] = []
    corrections: list[dict[str, str] | None] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"texts-file: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"texts-file: line {number} has no string field 'text'")
        given = record.get("concepts")
        if given is not None and not (
            isinstance(given, dict) and all(isinstance(v, str) for v in given.values())
        ):
            raise ValueError(f"texts-file: line {number}: 'concepts' must map names to strings")
        texts.append(record["text"])
        corrections.append(given)
    if not texts:
        raise ValueError("texts-file: the file holds no texts")
    return texts, corrections


TOP_TOKENS = 3


def _shown(concepts: dict[str, str]) -> str:
    return " ".join(f"{name}={value}" for name, value in concepts.items())


def _top_tokens(explain: dict[str, list[list[Any]]]) -> str:
    """Per concept, its ``TOP_TOKENS`` strongest tokens with signed scores (the table view;
    ``--json`` has every token)."""
    lines = []
    for name, scores in explain.items():
        strongest = sorted(scores, key=lambda pair: -abs(pair[1]))[:TOP_TOKENS]
        shown = ", ".join(
            f"{token.strip() or repr(token)} {score:+.2f}" for token, score in strongest
        )
        lines.append(f"{name}: {shown}")
    return "\n".join(lines)


@concepts_app.command("predict")
def predict(
    ref: Annotated[str, typer.Argument(help="A concept_bottleneck version id or alias.")],
    texts_file: Annotated[
        Path,
        typer.Option(
            "--texts-file",
            help='JSON Lines, one {"text": ..., "concepts": {name: value}} per input '
            '("concepts", the corrections, optional and used with --intervene).',
            exists=True,
            dir_okay=False,
        ),
    ],
    intervene: Annotated[
        bool,
        typer.Option(
            "--intervene",
            help="Steer each text's corrected concepts' masks first (restored after); the "
            "plain prediction is shown as label_before / concepts_before.",
        ),
    ] = False,
    explain: Annotated[
        bool,
        typer.Option(
            "--explain",
            help="Add token attributions per concept: gradient x input of each token for the "
            "predicted value through the concept's own subnetwork, scaled to [-1, 1] per "
            "concept; with --intervene, of the prediction after the intervention.",
        ),
    ] = False,
    as_json: JsonOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
    tls_ca: CaOption = None,
) -> None:
    """Predict the concepts and label of each text with a concept bottleneck version (needs
    a server: --server / MODELSURGERY_SERVER)."""
    with reported_errors(as_json):
        texts, corrections = read_texts_file(texts_file)
        if not intervene and any(corrections):
            fail(
                "texts-file: 'concepts' corrections need --intervene", EXIT_INVALID, as_json=as_json
            )
        with connect(server, token, tls_ca) as client:
            predictions = client.predict_concepts(
                ref, texts, corrections if intervene else None, explain
            )
    if as_json:
        for prediction in predictions:
            emit_json_line(prediction)
        return
    columns = ["#", "label", "concepts"]
    if intervene:
        columns += ["label before", "concepts before"]
    if explain:
        columns.append("top tokens")
    table = Table(*columns)
    for index, p in enumerate(predictions):
        row: list[Any] = [str(index), p["label"], _shown(p["concepts"])]
        if intervene:
            row += [p["label_before"], _shown(p["concepts_before"])]
        if explain:
            row.append(_top_tokens(p["explain"]))
        plain_row(table, *row)
    out.print(table)


def register_concepts_command(app: typer.Typer) -> None:
    app.add_typer(concepts_app, name="concepts")
