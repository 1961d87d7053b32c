"""The job-level evaluation: gates judge the final model against the job's base, lineage
re-checks every ancestor's stored suite, and ``eval`` reproduces a job's numbers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import run_job
from test_rome import FACT, QUICK

from modelsurgery.evaluation.lineage import own_suite
from modelsurgery.proto.spec import SpecError, parse_spec
from modelsurgery.server.executor import JobOutcome
from modelsurgery.server.worker import SurgeryWorker

SECOND_FACT = {
    "prompt": "{} speaks",
    "subject": "she",
    "target_new": "japanese",
    "ground_truth": "french",
    "rephrase_prompt": "she lives and speaks",
    "locality_prompt": "he speaks",
    "locality_ground_truth": "english",
}


@pytest.fixture
def env(job_env: dict[str, Any]) -> dict[str, Any]:
    return job_env


def run(env: dict[str, Any], spec: dict[str, Any]) -> JobOutcome:
    return run_job(env, **spec)


def mask(heads: list[str], **extra: object) -> dict[str, Any]:
    return {"method": "mask_heads", "heads": heads, **extra}


def rome(fact: dict[str, str]) -> dict[str, Any]:
    return {"method": "rome", "facts": [fact], "layer": 1, **QUICK}


def test_gates_judge_the_final_model_against_the_base(env: dict[str, Any]) -> None:
    """Two maskings, each measuring its own perplexity: the job's perplexity_ratio is the
    final model over the base (reusing op0's before and op1's after), not op1's ratio."""
    ops = [mask(["0.1", "1.2"], evaluate_perplexity=True), mask(["1.0"], evaluate_perplexity=True)]
    done = run(env, {"base": str(env["folder"]), "operations": ops})
    m = done.metrics
    assert done.state == "SUCCEEDED", done.error
    assert m["perplexity_base"] == m["op0.perplexity_before"]
    assert m["perplexity"] == m["op1.perplexity_after"]
    assert m["perplexity_ratio"] == pytest.approx(m["perplexity"] / m["perplexity_base"])
    assert m["perplexity_ratio"] != pytest.approx(m["op1.perplexity_ratio"])
    assert (m["op0.heads_masked"], m["op1.heads_masked"]) == (2.0, 1.0)

    threshold = m["perplexity_ratio"] * 0.999
    gated = {"perplexity_ratio": f"<= {threshold}"}
    failed = run(env, {"base": str(env["folder"]), "operations": ops, "gates": gated})
    assert failed.state == "FAILED"
    assert failed.gates[0].value == pytest.approx(m["perplexity_ratio"])


def test_a_gate_decides_what_is_measured(env: dict[str, Any]) -> None:
    """mask_heads measures no perplexity of its own; a perplexity gate makes the job do it."""
    spec = {"base": str(env["folder"]), "operations": [mask(["0.3"])]}
    assert "perplexity_ratio" not in run(env, spec).metrics
    gated = run(env, {**spec, "gates": {"perplexity_ratio": "<= 100"}})
    assert gated.state == "SUCCEEDED", gated.error
    assert gated.metrics["perplexity_ratio"] > 0
    assert "op0.perplexity_ratio" not in gated.metrics


def test_lineage_rechecks_earlier_facts_and_eval_reproduces_the_job(env: dict[str, Any]) -> None:
    first = run(env, {"base": str(env["folder"]), "operations": [rome(FACT)]})
    assert first.state == "SUCCEEDED", first.error
    assert "lineage_facts" not in first.metrics
    stored = own_suite(env["store"], first.version_id)
    assert stored is not None and [f.subject for f in stored.facts] == ["france"]
    assert len(stored.locality_reference) == 1 and stored.locality_reference[0][0]

    second = run(env, {"base": first.version_id, "operations": [rome(SECOND_FACT)]})
    assert second.state == "SUCCEEDED", second.error
    m = second.metrics
    assert m["lineage_facts"] == 1.0
    assert {"lineage_efficacy", "lineage_paraphrase", "lineage_locality"} <= set(m)
    assert {"efficacy", "paraphrase", "locality", "op0.efficacy", "op0.v_loss"} <= set(m)

    worker = SurgeryWorker(env["settings"], num_threads=1)
    again = worker.evaluate(second.version_id, first.version_id, b"", False)[0]
    for name in ("efficacy", "paraphrase", "locality", "probability_gain", "lineage_efficacy"):
        assert again[name] == pytest.approx(m[name], abs=1e-6), name
    assert again["lineage_locality"] == pytest.approx(m["lineage_locality"], abs=1e-6)


def test_lineage_gates_are_refused_without_a_stored_suite(env: dict[str, Any]) -> None:
    from modelsurgery.evaluation.lineage import lineage_suites, stored_kinds
    from modelsurgery.proto.spec import check_gates

    first = run(env, {"base": str(env["folder"]), "operations": [mask(["0.1"])]})
    spec = parse_spec(
        {
            "base": first.version_id,
            "operations": [mask(["1.1"])],
            "gates": {"lineage_efficacy": ">= 1"},
        }
    )
    kinds = stored_kinds(lineage_suites(env["store"], first.version_id))
    with pytest.raises(SpecError) as error:
        check_gates(spec.gates, spec.operations, kinds)
    assert error.value.field == "gates.lineage_efficacy"


@pytest.mark.parametrize(
    ("gates", "field", "words"),
    [
        ({"heads_masked": ">= 1"}, "gates.heads_masked", "op0.heads_masked"),
        ({"efficacy": ">= 1"}, "gates.efficacy", "no part of this job"),
        ({"op1.heads_masked": ">= 1"}, "gates.op1.heads_masked", "does not exist"),
        ({"op0.efficacy": ">= 1"}, "gates.op0.efficacy", "does not report"),
        ({"perplexity_ratoi": "<= 2"}, "gates.perplexity_ratoi", "perplexity_ratio"),
    ],
)
def test_unproducible_gates_are_refused_at_parse(gates: dict, field: str, words: str) -> None:
    with pytest.raises(SpecError) as error:
        parse_spec({"base": "x", "operations": [mask(["0.1"])], "gates": gates})
    assert error.value.field == field
    assert words in error.value.message


def test_suite_is_stored_only_when_there_is_something_to_recheck(env: dict[str, Any]) -> None:
    done = run(env, {"base": str(env["folder"]), "operations": [mask(["0.2"])]})
    assert own_suite(env["store"], done.version_id) is None
    assert torch.isfinite(torch.tensor(done.metrics["parameter_ratio"]))


def test_one_operation_figures_are_the_job_figures(env: dict[str, Any]) -> None:
    """In a one-operation job op0.X is X: one measurement with the spec's one protocol,
    recorded in the stored suite."""
    operation = {**rome(FACT), "evaluate_perplexity": True}
    spec = {
        "base": str(env["folder"]),
        "operations": [operation],
        "evaluation": {"perplexity_tokens": 64, "perplexity_window": 32},
    }
    done = run(env, spec)
    assert done.state == "SUCCEEDED", done.error
    for name in ("perplexity_ratio", "efficacy", "paraphrase", "locality", "probability_gain"):
        assert done.metrics[f"op0.{name}"] == done.metrics[name], name
    assert done.metrics["op0.perplexity_before"] == done.metrics["perplexity_base"]
    suite = own_suite(env["store"], done.version_id)
    assert suite is not None and suite.perplexity is not None
    assert (suite.perplexity.tokens, suite.perplexity.window) == (64, 32)


def test_a_one_operation_edit_scores_its_facts_twice(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before and after the edit, shared by the operation's figures and the job's."""
    from modelsurgery.evaluation import measure

    calls: list[int] = []
    score = measure.score_facts

    def counted(*args: Any) -> Any:
        calls.append(len(args[3]))
        return score(*args)

    monkeypatch.setattr(measure, "score_facts", counted)
    memit = {**rome(FACT), "method": "memit", "layers": [1]}
    memit.pop("layer")
    done = run(env, {"base": str(env["folder"]), "operations": [memit]})
    assert done.state == "SUCCEEDED", done.error
    assert "op0.efficacy" in done.metrics and "efficacy" in done.metrics
    assert calls == [1, 1]


def test_a_later_operation_is_measured_on_the_model_it_changed(env: dict[str, Any]) -> None:
    """op1's figures compare the model after op0 with the model after op1."""
    ops = [mask(["0.1"]), mask(["1.0"])]
    gates = {"op1.perplexity_ratio": "> 0"}
    done = run(env, {"base": str(env["folder"]), "operations": ops, "gates": gates})
    assert done.state == "SUCCEEDED", done.error
    m = done.metrics
    assert "op0.perplexity_ratio" not in m
    assert m["op1.perplexity_after"] == m["perplexity"]
    assert m["op1.perplexity_before"] != m["perplexity_base"]
    assert m["op1.perplexity_ratio"] == pytest.approx(
        m["op1.perplexity_after"] / m["op1.perplexity_before"]
    )


def test_per_operation_perplexity_settings_point_to_the_job_protocol() -> None:
    with pytest.raises(SpecError) as error:
        parse_spec({"base": "b", "operations": [mask(["0.1"], perplexity_tokens=128)]})
    assert error.value.field == "operations[0].perplexity_tokens"
    assert "evaluation.perplexity_tokens" in str(error.value)
