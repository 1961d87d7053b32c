"""`modelsurgery methods` and the JSON Schema describe every parameter of every method; a field
without a description fails here unless listed below with the reason."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from modelsurgery.client.cli import app
from modelsurgery.client.cli_common import EXIT_INVALID
from modelsurgery.editing.registry import method_configs
from modelsurgery.proto.field_docs import docstring_fields, field_descriptions
from modelsurgery.proto.spec import spec_json_schema

UNDESCRIBED = {
    "memit": {"v_loss_layer"},  # KnowledgeEditConfig (editing/knowledge/config.py)
    "rome": {"v_loss_layer"},
}


def test_every_parameter_of_every_method_is_described() -> None:
    for name, config in method_configs().items():
        missing = {
            field
            for field, text in field_descriptions(config).items()
            if not text and field != "method"
        }
        assert missing == UNDESCRIBED.get(name, set()), name


def test_the_json_schema_carries_the_descriptions() -> None:
    definitions = spec_json_schema()["$defs"]
    heads = definitions["MaskHeadsConfig"]["properties"]["heads"]
    assert "quote them in YAML" in heads["description"]
    # A field described only in its config's docstring (a shared base class's) is too.
    assert "Adam steps" in definitions["RomeConfig"]["properties"]["v_steps"]["description"]


def test_docstring_entries_name_fields_and_follow_indented_lines() -> None:
    class Config:
        """What it does.

        alpha, beta: two fields
            described at once.
        gamma (when): one field.
        Metrics: not a field.
        """

    from pydantic import BaseModel

    described = type("Described", (BaseModel,), {"__doc__": Config.__doc__, "__annotations__": {
        "alpha": int, "beta": int, "gamma": int}})  # fmt: skip
    assert docstring_fields(described) == {
        "alpha": "two fields described at once.",
        "beta": "two fields described at once.",
        "gamma": "(when) one field.",
    }


def test_methods_lists_every_method_with_its_parameters() -> None:
    result = CliRunner().invoke(app, ["methods", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [m["method"] for m in listed] == list(method_configs())
    mask = next(m for m in listed if m["method"] == "mask_heads")
    assert mask["description"] == "Mask attention heads by zeroing their o_proj input columns"
    heads, perplexity = mask["parameters"]
    assert (heads["name"], heads["type"], heads["required"]) == ("heads", "list[str]", True)
    assert (perplexity["default"], perplexity["required"]) == (False, False)
    text = CliRunner().invoke(app, ["methods", "iti"]).stdout
    assert "top_k (int; default 16): How many heads to shift" in text
    unknown = CliRunner().invoke(app, ["methods", "no_such_method"])
    assert unknown.exit_code == EXIT_INVALID and "known methods: ablate_direction" in unknown.output
