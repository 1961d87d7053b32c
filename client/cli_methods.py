"""``modelsurgery methods [NAME]``: every registered method with its parameters, their types,
defaults and descriptions, read from the method configs: a field's ``Field(description=...)``,
else its entry in the config's docstring (``proto.field_docs``), as the JSON Schema of
``modelsurgery schema`` carries them."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.text import Text

from modelsurgery.client.cli_common import EXIT_INVALID, JsonOption, emit_json, fail, out
from modelsurgery.proto.field_docs import described_methods

# Shown where a field has no description yet (tests/test_method_descriptions.py lists them).
UNDESCRIBED = "-"


def _print(data: dict[str, Any]) -> None:
    """The method's line, then a line per parameter: name, type, default, description."""
    out.print(Text(f"{data['method']}: {data['description']}", style="bold"))
    for p in data["parameters"]:
        default = (
            "required" if p["required"] else f"default {json.dumps(p['default'], default=str)}"
        )
        line = Text(f"  {p['name']}", style="cyan")
        line.append(f" ({p['type']}; {default}): ", style="dim")
        line.append(p["description"] or UNDESCRIBED)
        out.print(line)
    out.print()


def register_methods_command(app: typer.Typer) -> None:
    @app.command()
    def methods(
        name: Annotated[str | None, typer.Argument(help="Only this method.")] = None,
        as_json: JsonOption = False,
    ) -> None:
        """List every surgery method with its parameters, defaults and descriptions."""
        every = described_methods()
        if name is not None and name not in {m["method"] for m in every}:
            known = ", ".join(m["method"] for m in every)
            fail(f"unknown method {name!r}; known methods: {known}", EXIT_INVALID, as_json=as_json)
        chosen = [m for m in every if name in (None, m["method"])]
        if as_json:
            emit_json(chosen[0] if name is not None else chosen)
            return
        for data in chosen:
            _print(data)
