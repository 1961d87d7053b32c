"""Serving a concept_bottleneck version: a job through the executor stores it, the worker's
predict path attaches it from the store, bounds name the field, and the SDK/CLI requests."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import run_job
from test_concepts import write_examples

from modelsurgery.client.cli_concepts import read_texts_file
from modelsurgery.client.sdk import concept_prediction, concepts_request
from modelsurgery.editing.attachments import attach_hooks, stored_hook_artifacts
from modelsurgery.proto.job_state import JobState
from modelsurgery.server.concepts import MAX_CONCEPT_TEXTS, concept_predictions, request_problem
from modelsurgery.server.executor import load_base
from modelsurgery.server.generation import PromptError
from modelsurgery.v1 import jobs_pb2

OPERATION = {
    "method": "concept_bottleneck",
    "examples_file": "reviews.jsonl",
    "concepts": ["food"],
    "layers": [3],
    "epochs": 6,
    "lr": 0.05,
    "backbone_lr": 0.0,
    "batch_size": 6,
    "max_tokens": 16,
    "sparsity": 0.5,
}


@pytest.fixture
def stored(job_env: dict[str, Any], tmp_path: Path) -> tuple[dict[str, Any], str]:
    write_examples(tmp_path)
    env = {**job_env, "settings": dataclasses.replace(job_env["settings"], data_roots=(tmp_path,))}
    outcome = run_job(env, [OPERATION])
    assert outcome.state is JobState.SUCCEEDED, outcome.error
    assert outcome.metrics["op0.concept_accuracy_food"] >= 0.0
    return env, outcome.version_id


def _predict(env: dict[str, Any], version: str, texts: list[str], corrections: Any = None):
    base = load_base(version, env["store"], env["cache"], env["settings"])
    artifacts = stored_hook_artifacts(env["store"], version)
    with base.lock, attach_hooks(base.model, artifacts):
        return concept_predictions(base.model, base.tokenizer, texts, corrections)


def test_a_stored_version_predicts_and_intervenes_through_its_hooks(stored) -> None:
    env, version = stored
    plain = _predict(env, version, ["bad city bad food"])
    assert set(plain[0]) == {"label", "concepts", "label_before", "concepts_before"}
    assert plain[0]["label"] in {"1", "5"} and set(plain[0]["concepts"]) == {"food"}
    assert plain[0]["label_before"] == "" and plain[0]["concepts_before"] == {}
    flipped = "Positive" if plain[0]["concepts"]["food"] != "Positive" else "Negative"
    out = _predict(env, version, ["bad city bad food"], [{"food": flipped}])
    assert out[0]["concepts_before"] == plain[0]["concepts"]
    with pytest.raises(PromptError) as caught:
        _predict(env, version, ["good food"], [{"food": "Great"}])
    assert caught.value.field == "corrections[0].food"


def test_request_bounds_name_the_field() -> None:
    def problem(**fields: Any) -> tuple[str, str] | None:
        return request_problem(jobs_pb2.PredictConceptsRequest(**fields))

    assert problem(texts=["x"]) == ("ref", "must not be empty")
    assert problem(ref="v")[0] == "texts"
    assert problem(ref="v", texts=["x"] * (MAX_CONCEPT_TEXTS + 1))[0] == "texts"
    assert problem(ref="v", texts=["ok", " "]) == ("texts[1]", "is empty")
    assert problem(ref="v", texts=["x" * 70_000])[0] == "texts[0]"
    assert problem(ref="v", texts=["a", "b"], intervene=True)[0] == "corrections"
    request = concepts_request("v", ["a"], [{"food": "Positive"}])
    assert request_problem(request) is None and request.intervene
    assert dict(request.corrections[0].concepts) == {"food": "Positive"}
    assert not concepts_request("v", "a", None).intervene


def test_prediction_json_has_before_fields_only_when_intervening() -> None:
    message = jobs_pb2.ConceptPrediction(label="4", concepts={"food": "Positive"})
    assert concept_prediction(message, False) == {"label": "4", "concepts": {"food": "Positive"}}
    assert set(concept_prediction(message, True)) == {
        "label", "concepts", "label_before", "concepts_before"
    }  # fmt: skip


def test_texts_file_lines_are_read_and_bad_ones_named(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    rows = [{"text": "good food"}, {"text": "bad", "concepts": {"food": "Negative"}}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert read_texts_file(path) == (["good food", "bad"], [None, {"food": "Negative"}])
    path.write_text('{"text": "a"}\n{"concepts": {}}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="texts-file: line 2 has no string field 'text'"):
        read_texts_file(path)
