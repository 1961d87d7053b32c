"""MEMIT on tiny seeded models: batch edits spread over a layer range."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_editable, build_tiny_tokenizer, tiny_model
from test_rome import FACT, QUICK, context
from test_rome import data_dir as data_dir

from modelsurgery.editing import memit
from modelsurgery.editing.knowledge.keys import keys_and_outputs
from modelsurgery.editing.registry import get_method
from modelsurgery.evaluation.facts import answer_scores
from modelsurgery.models.adapters import get_adapter

FACTS = [
    FACT,
    {"prompt": "{} speaks", "subject": "she", "target_new": "japanese", "ground_truth": "french"},
    {"prompt": "{} lives in", "subject": "he", "target_new": "tokyo", "ground_truth": "london"},
]


def answers_logp(model, tok) -> list[float]:
    pairs = [
        ("the capital of france is", " rome"),
        ("she speaks", " japanese"),
        ("he lives in", " tokyo"),
    ]
    return [a.mean_logp for a in answer_scores(model, tok, get_adapter(model), pairs)]


def site_targets(model, tok, config: memit.MemitConfig, data_dir: Path) -> torch.Tensor:
    """The v* targets z [F, d] MEMIT aims the last edited layer's outputs at (deterministic:
    the same optimisation ``run`` does, on the unedited model)."""
    deltas = memit.vstar_targets(model, tok, config, context(data_dir)).deltas
    return last_layer_outputs(model, tok, config) + deltas


def last_layer_outputs(model, tok, config: memit.MemitConfig) -> torch.Tensor:
    last = config.edit_layers(model.config)[-1]
    _, outputs = keys_and_outputs(
        model,
        tok,
        get_adapter(model),
        config.facts,
        key_layer=last,
        out_layer=last,
        templates=config.templates(),
    )
    return outputs


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_batch_edit_moves_every_fact_to_its_target(family: str, seed: int, data_dir: Path) -> None:
    """MEMIT's promise, on every family's layout: after the layer-by-layer updates the last
    edited layer's outputs at each fact's subject are most of the way to z (the lambda * C
    regulariser and template-averaged keys leave up to ~20% on these models; keys swapped
    between facts leave 150-250%). (Whether z then wins the next token depends
    on how far the v* optimisation got on a random 4-layer model, a property of the seed, not
    of MEMIT; the SmolLM2 end-to-end test checks efficacy on a real model.)"""
    model, tok = build_editable(family, seed=seed), build_tiny_tokenizer()
    adapter = get_adapter(model)
    config = memit.MemitConfig(
        facts=FACTS, layers=[0, 1], mom2_weight=0.01, second_pass=False, **QUICK
    )
    targets = site_targets(model, tok, config, data_dir)
    before = (targets - last_layer_outputs(model, tok, config)).norm(dim=-1)
    result = get_method("memit").run(model, tok, config, context(data_dir))
    assert set(result.changed) == {f"{adapter.mlp_out_path(i)}.weight" for i in (0, 1)}
    for name, tensor in result.changed.items():
        assert tensor.shape == model.get_submodule(name.removesuffix(".weight")).weight.shape
    after = (targets - last_layer_outputs(model, tok, config)).norm(dim=-1)
    assert (after < 0.3 * before).all(), (before.tolist(), after.tolist())
    assert result.metrics["v_loss"] < 5


def test_update_solves_normal_equations() -> None:
    torch.manual_seed(0)
    keys, resid = torch.randn(5, 12), torch.randn(5, 7)
    sample = torch.randn(100, 12, dtype=torch.float64)
    mom2 = sample.T @ sample / 100
    update = memit.memit_update(keys, resid, mom2, 0.3)
    k = keys.double()
    # d/dW of ||W K^T - R^T||^2 + weight * tr(W C W^T) vanishes at the update.
    gradient = (update @ k.T - resid.double().T) @ k + 0.3 * update @ mom2
    assert gradient.abs().max() < 1e-8
    tight = memit.memit_update(keys, resid, mom2, 1e-9)
    torch.testing.assert_close(tight @ k.T, resid.double().T, atol=1e-5, rtol=1e-5)


def test_layers_validation_names_the_field() -> None:
    llama = tiny_model("llama").config
    with pytest.raises(ValueError, match=r"^layers\[1\]: layer 9 out of range"):
        memit.MemitConfig(facts=FACTS, layers=[1, 9]).check_against(llama)
    with pytest.raises(ValueError, match=r"layers\[1\]: layers must be strictly ascending"):
        memit.MemitConfig(facts=FACTS, layers=[1, 1])
    with pytest.raises(ValueError, match="facts"):
        memit.MemitConfig(facts=[])
    assert memit.MemitConfig(facts=FACTS).edit_layers(llama) == [0, 1]
