"""Serving a concept_bottleneck version: a job through the executor stores it, the worker's
predict path attaches it from the store, bounds name the field, the SDK/CLI requests, and
the CLI with --explain through the RPC handler to a worker in this process."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import torch
from conftest import build_tiny_tokenizer, run_job
from security.service_under_test import Loop
from test_concepts import NEGATIVE, POSITIVE, job_operation, write_examples
from typer.testing import CliRunner

from modelsurgery.client import Client
from modelsurgery.client.cli import app
from modelsurgery.client.cli_concepts import read_texts_file
from modelsurgery.client.sdk import concept_prediction, concepts_request
from modelsurgery.editing.attachments import attach_hooks, stored_hook_artifacts
from modelsurgery.proto.job_state import JobState
from modelsurgery.server.concepts import (
    MAX_CONCEPT_TEXTS,
    concept_predictions,
    predict_concepts_rpc,
    prediction_message,
    request_problem,
)
from modelsurgery.server.executor import load_base
from modelsurgery.server.generation import PromptError
from modelsurgery.server.worker import SurgeryWorker
from modelsurgery.v1 import jobs_pb2, jobs_pb2_grpc


@pytest.fixture
def stored(job_env: dict[str, Any], tmp_path: Path) -> tuple[dict[str, Any], str]:
    write_examples(tmp_path)
    env = {**job_env, "settings": dataclasses.replace(job_env["settings"], data_roots=(tmp_path,))}
    outcome = run_job(env, [job_operation(3)])
    assert outcome.state is JobState.SUCCEEDED, outcome.error
    assert outcome.metrics["op0.concept_accuracy_food"] >= 0.0
    return env, outcome.version_id


def _predict(
    env: dict[str, Any], version: str, texts: list[str], corrections: Any = None, explain=False
):
    base = load_base(version, env["store"], env["cache"], env["settings"])
    artifacts = stored_hook_artifacts(env["store"], version)
    with base.lock, attach_hooks(base.model, artifacts):
        return concept_predictions(base.model, base.tokenizer, texts, corrections, explain)


def _pieces(text: str) -> list[str]:
    """The tokens of ``text`` as the job's tokenizer decodes each alone ("food" is <unk>)."""
    tokenizer = build_tiny_tokenizer()
    return [tokenizer.decode([i]) for i in tokenizer(text).input_ids]


def test_a_stored_version_predicts_intervenes_and_explains_through_its_hooks(stored) -> None:
    env, version = stored
    plain = _predict(env, version, ["bad city bad food"])
    assert set(plain[0]) == {"label", "concepts", "label_before", "concepts_before", "explain"}
    assert plain[0]["label"] in {"1", "5"} and set(plain[0]["concepts"]) == {"food"}
    assert plain[0]["label_before"] == "" and plain[0]["concepts_before"] == {}
    assert plain[0]["explain"] == {}
    explained = _predict(env, version, ["bad city bad food"], explain=True)[0]
    assert {**explained, "explain": {}} == plain[0]
    assert [token for token, _ in explained["explain"]["food"]] == _pieces("bad city bad food")
    # Through the message and back as the SDK returns it.
    returned = concept_prediction(prediction_message(explained), False, True)
    assert returned["explain"] == {"food": [list(pair) for pair in explained["explain"]["food"]]}
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
    assert concepts_request("v", "a", None, explain=True).explain
    assert not concepts_request("v", "a", None).explain


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


class _Actor:
    """Ray's ``actor.method.remote(*args)`` for a worker in this process: the call on a
    thread, awaited by the RPC handler as Ray's reference would be."""

    def __init__(self, worker: SurgeryWorker) -> None:
        self.worker = worker

    def __getattr__(self, name: str) -> SimpleNamespace:
        method = getattr(self.worker, name)
        return SimpleNamespace(remote=lambda *args: asyncio.to_thread(method, *args))


class _ConceptsService(jobs_pb2_grpc.JobServiceServicer):
    """JobService's PredictConcepts (server.job_service) with this process's worker."""

    def __init__(self, env: dict[str, Any]) -> None:
        self.store = env["store"]
        self.actor = _Actor(SurgeryWorker(env["settings"], torch.get_num_threads()))

    async def PredictConcepts(self, request, context):
        return await predict_concepts_rpc(self.store, self.actor, request, context)


@contextmanager
def _serving(env: dict[str, Any]) -> Iterator[str]:
    loop = Loop()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        jobs_pb2_grpc.add_JobServiceServicer_to_server(_ConceptsService(env), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = loop.run(start())
    try:
        yield f"127.0.0.1:{port}"
    finally:
        loop.run(server.stop(None))
        loop.close()


def test_the_cli_and_sdk_explain_each_concept_per_token(stored, tmp_path: Path) -> None:
    env, version = stored
    texts = tmp_path / "texts.jsonl"
    texts.write_text("\n".join(json.dumps({"text": t}) for t in (POSITIVE[1], NEGATIVE[0])) + "\n")
    with _serving(env) as address:
        args = ["concepts", "predict", version, "--texts-file", str(texts), "--explain"]
        result = CliRunner().invoke(app, [*args, "--json", "--server", address])
        assert result.exit_code == 0, result.output
        lines = [json.loads(x) for x in result.stdout.splitlines() if x.strip()]
        table = CliRunner().invoke(app, [*args, "--server", address])
        with Client(address, timeout=60) as client:
            plain = client.predict_concepts(version, [POSITIVE[1]])[0]
            flipped = "Negative" if plain["concepts"]["food"] == "Positive" else "Positive"
            (steered,) = client.predict_concepts(version, [POSITIVE[1]], [{"food": flipped}], True)
    assert [set(line) for line in lines] == [{"label", "concepts", "explain"}] * 2
    for line, text in zip(lines, (POSITIVE[1], NEGATIVE[0]), strict=True):
        (scores,) = line["explain"].values()
        assert [token for token, _ in scores] == _pieces(text)
        assert max(abs(score) for _, score in scores) == 1.0
    assert {k: lines[0][k] for k in plain} == plain
    assert table.exit_code == 0 and "top tokens" in table.stdout and "food:" in table.stdout
    assert steered["concepts_before"] == plain["concepts"]
    assert [token for token, _ in steered["explain"]["food"]] == _pieces(POSITIVE[1])
