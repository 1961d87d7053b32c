"""Intervention on a concept bottleneck (SparseCBM): gradient-guided mask swaps at unchanged
sparsity, steering a concept to the user's value, and restoring the masks after."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_tokenizer, tiny_model
from torch.nn import functional as F

from modelsurgery.editing.concepts.bottleneck import layer_inputs, new_spec
from modelsurgery.editing.concepts.config import CONCEPT_VALUES
from modelsurgery.editing.concepts.intervene import intervene, steer_mask, swap_entries
from modelsurgery.editing.concepts.predict import predict_concepts
from modelsurgery.editing.concepts.saliency import magnitude_saliency, update_masks
from modelsurgery.editing.concepts.train import new_bottleneck

TEXT = "the food was good and the city is big"


def test_swap_prunes_the_largest_gradient_and_regrows_the_most_negative() -> None:
    mask = torch.tensor([True, True, True, False, False, False])
    grad = torch.tensor([0.5, -0.2, 0.9, -0.7, 0.3, -0.1])
    assert swap_entries(mask, grad, 2) == 2
    # Pruned: index 2 (0.9) and 0 (0.5); regrown: 3 (-0.7) and 5 (-0.1).
    assert mask.tolist() == [False, True, False, True, False, True]


def test_swap_only_pairs_that_lower_the_loss() -> None:
    mask = torch.tensor([True, True, False, False])
    grad = torch.tensor([0.2, -0.5, 0.4, -0.1])
    # Best pair: prune 0 (+0.2) with regrow 3 (+0.1 gain); next pair would be -0.5 + -0.4.
    assert swap_entries(mask, grad, 2) == 1
    assert mask.tolist() == [False, True, False, True]
    assert swap_entries(torch.ones(3, dtype=torch.bool), torch.ones(3), 2) == 0


def sparse_bottleneck() -> tuple:
    """A tiny Llama (frozen), its tokenizer and a sparse bottleneck for "food" and "service"
    on layer 1 with magnitude masks at half density (one mask for both concepts)."""
    model, tokenizer = tiny_model("llama"), build_tiny_tokenizer()
    model.requires_grad_(False)
    spec = new_spec(
        model, ["food", "service"], CONCEPT_VALUES, ["1", "5"], [1], 16, True, "probabilities"
    )
    bottleneck = new_bottleneck(spec, model, seed=0)
    update_masks(bottleneck, magnitude_saliency(bottleneck), 0.5)
    return model, tokenizer, bottleneck


@pytest.fixture
def sparse_setup() -> tuple:
    return sparse_bottleneck()


def _target_other_than_predicted(bottleneck, inputs, concept: int) -> int:
    with torch.no_grad():
        predicted = int(bottleneck.concept_logits(inputs)[concept].argmax(-1))
    return (predicted + 1) % len(CONCEPT_VALUES)


def test_steering_keeps_sparsity_bounds_the_swap_and_lowers_the_loss(sparse_setup) -> None:
    model, tokenizer, bottleneck = sparse_setup
    inputs = layer_inputs(model, tokenizer, [TEXT], 1, 16)
    target = _target_other_than_predicted(bottleneck, inputs, 0)
    before = [m.clone() for m in bottleneck.masks]

    def loss() -> float:
        with torch.no_grad():
            logits = bottleneck.concept_logits(inputs)[0]
        return float(F.cross_entropy(logits, torch.tensor([target])))

    initial = loss()
    swapped = steer_mask(bottleneck, inputs, 0, target, fraction=0.3, steps=3)
    assert swapped > 0
    assert loss() < initial
    for old, new in zip(before, bottleneck.masks, strict=True):
        assert int(new[0].sum()) == int(old[0].sum())  # sparsity unchanged
        changed = int((old[0] != new[0]).sum())
        assert changed <= 2 * int(0.3 * int(old[0].sum()))  # pruned + regrown
        assert torch.equal(old[1], new[1])  # other concepts' masks untouched


def test_intervention_restores_the_masks_and_skips_agreeing_concepts(sparse_setup) -> None:
    model, tokenizer, bottleneck = sparse_setup
    inputs = layer_inputs(model, tokenizer, [TEXT], 1, 16)
    saved = [m.clone() for m in bottleneck.masks]
    with torch.no_grad():
        agreeing = int(bottleneck.concept_logits(inputs)[1].argmax(-1))
    target = _target_other_than_predicted(bottleneck, inputs, 0)
    outcome = intervene(bottleneck, inputs, {0: target, 1: agreeing}, steps=6)
    assert set(outcome.swapped) == {0}
    assert all(torch.equal(a, b) for a, b in zip(saved, bottleneck.masks, strict=True))
    assert outcome.label_logits.shape == (1, 2)


def test_predict_with_corrections_reports_before_and_names_bad_corrections(sparse_setup) -> None:
    model, tokenizer, bottleneck = sparse_setup
    plain = predict_concepts(model, tokenizer, bottleneck, [TEXT])[0]
    other = next(v for v in CONCEPT_VALUES if v != plain.concepts["food"])
    out = predict_concepts(model, tokenizer, bottleneck, [TEXT], [{"food": other}])[0]
    assert out.concepts_before == plain.concepts and out.label_before == plain.label
    with pytest.raises(ValueError, match=r"corrections\[0\]: unknown concept 'price'"):
        predict_concepts(model, tokenizer, bottleneck, [TEXT], [{"price": "Positive"}])
    with pytest.raises(ValueError, match=r"corrections\[0\].food: must be one of"):
        predict_concepts(model, tokenizer, bottleneck, [TEXT], [{"food": "Great"}])
    with pytest.raises(ValueError, match="corrections: 2 entries for 1 texts"):
        predict_concepts(model, tokenizer, bottleneck, [TEXT], [None, None])


def test_a_dense_bottleneck_refuses_intervention() -> None:
    model, tokenizer = tiny_model("llama"), build_tiny_tokenizer()
    spec = new_spec(model, ["food"], CONCEPT_VALUES, ["1", "5"], [1], 16, False, "probabilities")
    dense = new_bottleneck(spec, model, seed=0)
    inputs = layer_inputs(model, tokenizer, [TEXT], 1, 16)
    with pytest.raises(ValueError, match="needs a sparse concept bottleneck"):
        intervene(dense, inputs, {0: 1})
