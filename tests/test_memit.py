"""MEMIT on tiny seeded models: batch edits spread over a layer range."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama, build_tiny_tokenizer
from test_knowledge import build_editable
from test_rome import FACT, QUICK, context
from test_rome import data_dir as data_dir

from modelsurgery.editing import memit
from modelsurgery.editing.knowledge.evaluate import answer_scores
from modelsurgery.editing.registry import get_method
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


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox"])
def test_batch_edit_raises_all_targets(family: str, data_dir: Path) -> None:
    model, tok = build_editable(family), build_tiny_tokenizer()
    adapter = get_adapter(model)
    before = answers_logp(model, tok)
    config = memit.MemitConfig(facts=FACTS, layers=[0, 1], mom2_weight=0.01, **QUICK)
    result = get_method("memit").run(model, tok, config, context(data_dir))
    assert set(result.changed) == {f"{adapter.mlp_out_path(i)}.weight" for i in (0, 1)}
    for name, tensor in result.changed.items():
        assert tensor.shape == model.get_submodule(name.removesuffix(".weight")).weight.shape
    after = answers_logp(model, tok)
    gains = [a - b for a, b in zip(after, before, strict=True)]
    assert min(gains) > 0
    assert sum(gains) / len(gains) > 0.5
    assert result.metrics["efficacy"] >= 2 / 3
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
    llama = build_tiny_llama().config
    with pytest.raises(ValueError, match=r"^layers\[1\]: layer 9 out of range"):
        memit.MemitConfig(facts=FACTS, layers=[1, 9]).check_against(llama)
    with pytest.raises(ValueError, match=r"layers\[1\]: layers must be strictly ascending"):
        memit.MemitConfig(facts=FACTS, layers=[1, 1])
    with pytest.raises(ValueError, match="facts"):
        memit.MemitConfig(facts=[])
    assert memit.MemitConfig(facts=FACTS).edit_layers(llama) == [0, 1]
