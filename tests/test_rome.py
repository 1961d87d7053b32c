"""ROME on tiny seeded models (Llama: Linear layout; GPT-2: Conv1D layout)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_editable, build_tiny_tokenizer, tiny_model, write_corpus
from pydantic import ValidationError

from modelsurgery.editing import rome
from modelsurgery.editing.data import DATA_ENV
from modelsurgery.editing.knowledge.solve import SpdSolve, with_ridge
from modelsurgery.editing.registry import JobCancelled, MethodContext, get_method
from modelsurgery.evaluation.facts import answer_scores
from modelsurgery.evaluation.measure import JobMeasurements
from modelsurgery.evaluation.metrics import FACTS
from modelsurgery.models.adapters import get_adapter

FACT = {
    "prompt": "the capital of {} is",
    "subject": "france",
    "target_new": "rome",
    "ground_truth": "paris",
    "rephrase_prompt": "the city of france is",
    "locality_prompt": "the capital of italy is",
    "locality_ground_truth": "rome",
}
QUICK = {
    "v_steps": 20,
    "clamp_factor": 100.0,
    "weight_decay": 1e-4,
    "context_templates": ["{}", "it is big . {}", "we live in rome . {}"],
    "stats_samples": 16,
    "stats_window": 32,
    "evaluate_perplexity": False,
}


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "data"))
    write_corpus(tmp_path / "data")
    return tmp_path


def context(tmp_path: Path, events: list | None = None, digest: str = "tiny") -> MethodContext:
    sink = events.append if events is not None else (lambda e: None)
    return MethodContext(model_digest=digest, cache_dir=tmp_path / "cache", report=sink)


def target_logp(
    model, tok, prompt: str = "the capital of france is", answer: str = " rome"
) -> float:
    return answer_scores(model, tok, get_adapter(model), [(prompt, answer)])[0].mean_logp


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_edit_raises_target_and_is_rank_one(family: str, data_dir: Path) -> None:
    model, tok = build_editable(family), build_tiny_tokenizer()
    adapter = get_adapter(model)
    original = adapter.mlp_out(1).weight.detach().clone()
    before = target_logp(model, tok)
    config = rome.RomeConfig(facts=[FACT], layer=1, **QUICK)
    measurements, facts = JobMeasurements(tok, None), frozenset({FACTS})
    measurements.before_operation(0, model, facts, config.facts)
    result = get_method("rome").run(model, tok, config, context(data_dir))
    name = f"{adapter.mlp_out_path(1)}.weight"
    assert list(result.changed) == [name]
    stored = result.changed[name]
    assert stored.shape == adapter.mlp_out(1).module.weight.shape  # Conv1D keeps [in, out]
    torch.testing.assert_close(stored, adapter.mlp_out(1).module.weight)
    change = adapter.mlp_out(1).weight.detach() - original
    singular = torch.linalg.svdvals(change.double())
    assert singular[0] > 0
    assert singular[1] < 1e-6 * singular[0]
    assert target_logp(model, tok) > before + 0.5
    assert set(result.metrics) == {"v_loss", "v_steps_used"}  # the rest is the executor's
    figures = measurements.operation_figures(0, model, facts, config.facts)
    assert figures["probability_gain"] > 0
    assert figures["efficacy"] == 1.0
    assert {"paraphrase", "locality", "probability_gain"} <= set(figures)


def test_update_maps_averaged_key_to_target() -> None:
    torch.manual_seed(0)
    keys = torch.randn(200, 16, dtype=torch.float64)
    mom2 = keys.T @ keys / 200
    key, delta = torch.randn(16), torch.randn(8)
    update = rome.rank_one_update(key, delta, SpdSolve(lambda: with_ridge(mom2)))
    torch.testing.assert_close(update @ key.double(), delta.double())
    assert torch.linalg.matrix_rank(update) == 1
    plain = rome.rank_one_update(key, delta, None)
    torch.testing.assert_close(plain @ key.double(), delta.double())


def test_factored_solve_matches_a_direct_solve_and_leaves_c_alone() -> None:
    """The factored solve is C^-1 k with the tiny ridge; C itself is not written; a C that is
    not positive definite in floating point falls back to LU."""
    torch.manual_seed(0)
    keys = torch.randn(50, 16, dtype=torch.float64)
    mom2 = keys.T @ keys / 50
    kept = mom2.clone()
    k = torch.randn(16, dtype=torch.float64)
    ridged = mom2 + 1e-6 * mom2.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(SpdSolve(lambda: with_ridge(mom2))(k), torch.linalg.solve(ridged, k))
    assert torch.equal(mom2, kept)
    indefinite = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64))
    k3 = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    ridge = 1e-6 * indefinite.diagonal().mean()
    expected = k3 / (indefinite.diagonal() + ridge)
    torch.testing.assert_close(SpdSolve(lambda: with_ridge(indefinite))(k3), expected)


def test_sequential_facts_and_edited_model(data_dir: Path) -> None:
    """A list of facts is applied one after another; editing an edited model works."""
    model, tok = build_editable("llama", seed=1), build_tiny_tokenizer()
    second = {**FACT, "prompt": "{} speaks", "subject": "he", "target_new": "german"}
    second.pop("ground_truth")
    second.pop("rephrase_prompt")
    before = [target_logp(model, tok), target_logp(model, tok, "he speaks", " german")]
    config = rome.RomeConfig(facts=[FACT, second], layer=0, **QUICK)
    rome.run(model, tok, config, context(data_dir))
    after = [target_logp(model, tok), target_logp(model, tok, "he speaks", " german")]
    assert all(x > y for x, y in zip(after, before, strict=True))
    again = rome.run(
        model, tok, rome.RomeConfig(facts=[second], layer=1, **QUICK), context(data_dir)
    )
    assert len(again.changed) == 1


def test_statistics_reused_by_second_job(data_dir: Path) -> None:
    model, tok = tiny_model("llama"), build_tiny_tokenizer()
    events: list[dict] = []
    config = rome.RomeConfig(facts=[FACT], layer=1, evaluate=False, **QUICK)
    rome.run(model, tok, config, context(data_dir, events))
    assert any(e["message"].endswith("computing") for e in events)
    events.clear()
    rome.run(tiny_model("llama"), tok, config, context(data_dir, events))
    assert not any(e["message"].endswith("computing") for e in events)
    assert any(e["message"].endswith("cache hit") for e in events)


def test_config_errors_name_the_field() -> None:
    llama = tiny_model("llama").config
    with pytest.raises(ValueError, match=r"^layer: layer 5 out of range \(model has 2 layers\)"):
        rome.RomeConfig(facts=[FACT], layer=5).check_against(llama)
    with pytest.raises(ValidationError) as info:
        rome.RomeConfig(facts=[])
    assert info.value.errors()[0]["loc"] == ("facts",)
    with pytest.raises(ValidationError, match="v_stpes"):
        rome.RomeConfig(facts=[FACT], v_stpes=3)
    with pytest.raises(ValidationError, match="context_templates"):
        rome.RomeConfig(facts=[FACT], context_templates=["no slot"])
    rome.RomeConfig(facts=[FACT]).check_against(llama)


def test_cancellation_stops_the_edit(data_dir: Path) -> None:
    model, tok = tiny_model("llama"), build_tiny_tokenizer()
    ctx = context(data_dir)
    ctx.is_cancelled = lambda: True
    original = get_adapter(model).mlp_out(1).weight.detach().clone()
    with pytest.raises(JobCancelled):
        rome.run(model, tok, rome.RomeConfig(facts=[FACT], layer=1, **QUICK), ctx)
    torch.testing.assert_close(get_adapter(model).mlp_out(1).weight, original)
