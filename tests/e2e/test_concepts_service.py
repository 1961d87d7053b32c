"""Concept subnetworks through a real server: a ``concept_bottleneck`` job on a tiny Llama
from a JSONL file under the server's data root, then predictions and an intervention from the
SDK and the CLI (token attributions with --explain), and a bad request answered with the
field it names."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_concepts import NEGATIVE, POSITIVE, job_operation, write_examples
from typer.testing import CliRunner

from modelsurgery.client import Client
from modelsurgery.client.cli import app
from modelsurgery.client.errors import InvalidArgument
from modelsurgery.server.process import ServerProcess, start_server
from modelsurgery.v1 import jobs_pb2

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def concepts_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("concepts-data")
    write_examples(data)
    home = tmp_path_factory.mktemp("concepts-home")
    process = start_server(home, "--data-root", str(data), model_roots=(tiny_model_dir,))
    yield process
    process.stop()


def cli_intervene(
    server: ServerProcess, version_id: str, corrected: dict, tmp_path: Path, *flags: str
) -> dict:
    """``modelsurgery concepts predict VERSION --intervene --json [flags]`` on one text with
    its corrections: the one JSON line it prints."""
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps(corrected) + "\n")
    args = ["concepts", "predict", version_id, "--texts-file", str(texts), "--intervene", *flags]
    result = CliRunner().invoke(app, [*args, "--json", "--server", server.address])
    assert result.exit_code == 0, result.output
    (line,) = [json.loads(x) for x in result.stdout.splitlines() if x.strip()]
    return line


def test_a_concept_job_predicts_and_intervenes_over_grpc(
    concepts_server: ServerProcess, tiny_model_dir: Path, tmp_path: Path
) -> None:
    with Client(concepts_server.address, timeout=120) as client:
        job = client.wait(
            client.submit({"base": str(tiny_model_dir), "operations": [job_operation(1)]}).id,
            timeout=300,
        )
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
        assert 0.0 <= job.metrics["op0.concept_accuracy_food"] <= 1.0
        plain = client.predict_concepts(job.version_id, [POSITIVE[0], NEGATIVE[0]])
        assert [set(p["concepts"]) for p in plain] == [{"food"}, {"food"}]
        assert all("label_before" not in p for p in plain)
        flipped = "Negative" if plain[0]["concepts"]["food"] == "Positive" else "Positive"
        steered = client.predict_concepts(job.version_id, [POSITIVE[0]], [{"food": flipped}])
        assert steered[0]["concepts_before"] == plain[0]["concepts"]
        assert steered[0]["concepts"]["food"] == flipped
        # The intervention is not kept: the next plain call predicts as before.
        assert client.predict_concepts(job.version_id, [POSITIVE[0]]) == plain[:1]
        with pytest.raises(InvalidArgument, match=r"corrections\[0\] unknown concept 'taste'"):
            client.predict_concepts(job.version_id, [POSITIVE[0]], [{"taste": "Positive"}])

    corrected = {"text": POSITIVE[1], "concepts": {"food": flipped}}
    line = cli_intervene(concepts_server, job.version_id, corrected, tmp_path)
    assert set(line) >= {"label", "concepts", "label_before", "concepts_before"}

    line = cli_intervene(concepts_server, job.version_id, corrected, tmp_path, "--explain")
    assert set(line["explain"]) == {"food"}
    scores = line["explain"]["food"]
    assert len(scores) == len(POSITIVE[1].split())  # the tiny tokenizer: one token a word
    assert all(isinstance(token, str) and -1.0 <= score <= 1.0 for token, score in scores)
    assert max(abs(score) for _, score in scores) == 1.0


def test_a_concept_job_on_smollm2_predicts_and_intervenes(
    concepts_server: ServerProcess, tmp_path: Path
) -> None:
    """The same job on the real model (masks on its top layer), then a prediction and an
    intervention from the CLI."""
    with Client(concepts_server.address, timeout=120) as client:
        job = client.wait(
            client.submit({"base": "smollm2-135m", "operations": [job_operation(29)]}).id,
            timeout=600,
        )
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
        assert job.metrics["op0.mask_density"] == pytest.approx(0.5, abs=1e-3)
        plain = client.predict_concepts(job.version_id, [NEGATIVE[1]])
    flipped = "Negative" if plain[0]["concepts"]["food"] == "Positive" else "Positive"
    corrected = {"text": NEGATIVE[1], "concepts": {"food": flipped}}
    line = cli_intervene(concepts_server, job.version_id, corrected, tmp_path)
    assert line["concepts_before"] == plain[0]["concepts"]
    assert line["concepts"]["food"] == flipped
