"""The job-level evaluation through the real server: gates on the final model against the
base, gate names checked at submit, and EvaluateVersion / ``modelsurgery eval`` reproducing a
job's numbers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelsurgery.client import Client, FailedPrecondition, InvalidArgument
from modelsurgery.client.cli import app
from modelsurgery.server.process import ServerProcess, start_server
from modelsurgery.v1 import jobs_pb2

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    roots = (tmp_path_factory.getbasetemp(),)
    process = start_server(tmp_path_factory.mktemp("home"), model_roots=roots)
    yield process
    # A graceful stop lets Ray shut down before the next module starts its own (a SIGKILLed
    # Ray still dying beside a starting one made that start time out once in CI).
    process.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.address, timeout=120) as c:
        yield c


def two_maskings(base: Path, **extra: object) -> dict:
    ops = [
        {"method": "mask_heads", "heads": ["0.1", "1.2"], "evaluate_perplexity": True},
        {"method": "mask_heads", "heads": ["1.0"], "evaluate_perplexity": True},
    ]
    return {"base": str(base), "operations": ops, **extra}


def test_gate_fails_on_the_final_model_and_eval_reproduces(
    client: Client, server: ServerProcess, tiny_model_dir: Path
) -> None:
    done = client.wait(client.submit(two_maskings(tiny_model_dir)).id, timeout=300)
    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error
    m = dict(done.metrics)
    assert m["perplexity_ratio"] == pytest.approx(
        m["op1.perplexity_after"] / m["op0.perplexity_before"]
    )

    limit = {"perplexity_ratio": f"<= {m['perplexity_ratio'] * 0.999}"}
    gated = client.wait(client.submit(two_maskings(tiny_model_dir, gates=limit)).id, timeout=300)
    assert gated.state == jobs_pb2.JOB_STATE_FAILED
    assert [(g.metric, g.passed) for g in gated.gates] == [("perplexity_ratio", False)]
    assert not gated.version_id

    again = client.evaluate(done.version_id)
    parent = client.get_version(done.version_id).version.parent_id
    assert again.against == parent
    assert again.metrics["perplexity_ratio"] == pytest.approx(m["perplexity_ratio"], rel=1e-6)

    result = CliRunner().invoke(
        app, ["eval", done.version_id, "--json", "--server", server.address]
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert printed["metrics"]["perplexity_ratio"] == pytest.approx(m["perplexity_ratio"], rel=1e-6)


def test_gate_nothing_produces_is_refused_at_submit(client: Client, tiny_model_dir: Path) -> None:
    """The SDK refuses what the spec alone shows; the server also knows the base's lineage."""
    spec = two_maskings(tiny_model_dir, gates={"efficacy": ">= 0.9"})
    with pytest.raises(InvalidArgument) as refused:
        client.submit(spec)
    assert refused.value.field == "spec.gates.efficacy" and isinstance(refused.value, ValueError)
    spec = two_maskings(tiny_model_dir, gates={"lineage_efficacy": ">= 0.9"})
    with pytest.raises(InvalidArgument) as err:
        client.submit(spec)
    assert err.value.field == "spec.gates.lineage_efficacy"


def test_evaluate_version_checks_its_input(client: Client, tiny_model_dir: Path) -> None:
    root = client.import_model(str(tiny_model_dir)).id
    with pytest.raises(FailedPrecondition) as err:
        client.evaluate(root)
    assert err.value.field == "against"
    with pytest.raises(InvalidArgument) as err:
        client.evaluate(root, against=root, suite={"facts": [{"prompt": "x"}]})
    assert err.value.field is not None and err.value.field.startswith("suite_json")
    pairs = {"pairs": [{"stereo": "he is a doctor", "anti": "she is a doctor"}]}
    judged = client.evaluate(root, against=root, suite=pairs)
    assert judged.metrics["stereotype_share"] == judged.metrics["stereotype_share_base"]
    per_case = client.evaluate(root, against=root, suite=pairs, per_case=True)
    (case,) = per_case.cases
    assert (case.suite, case.index, case.label) == ("pairs", 0, "he is a doctor / she is a doctor")
    assert case.figures["bias_gap"] == case.figures["bias_gap_base"]
    assert not judged.cases  # only when asked
