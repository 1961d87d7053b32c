"""Token attributions per concept (SparseCBM's input level): gradient x input on the token
embeddings through each concept's own masked pass, one normalised score per token, the
intervened pass where there is one, and a token made to drive a concept ranking top."""

from __future__ import annotations

import pytest
import torch
from test_concepts_intervene import sparse_bottleneck

from modelsurgery.editing.concepts.bottleneck import LayerInputs, first_layer_input
from modelsurgery.editing.concepts.config import CONCEPT_VALUES
from modelsurgery.editing.concepts.explain import raw_attributions, token_attributions
from modelsurgery.editing.concepts.predict import predict_concepts

TEXT = "the food was good and the city is big"
CITY = 6  # the position of "city" in TEXT


@pytest.fixture
def setup() -> tuple:
    model, tokenizer, bottleneck = sparse_bottleneck()
    for mask in bottleneck.masks:
        mask[1] = ~mask[1]  # magnitude gives every concept one mask; "service" the other half
    return model, tokenizer, bottleneck


def _head_input(model, bottleneck, embeds: torch.Tensor, concept: int) -> torch.Tensor:
    """What concept ``concept``'s linear head reads (its standardised pooled state) when the
    model runs on ``embeds`` through that concept's masked pass."""
    attention = torch.ones(embeds.shape[:2], dtype=torch.long)
    with torch.no_grad():
        hidden, kwargs = first_layer_input(
            model, bottleneck.first, inputs_embeds=embeds, attention_mask=attention
        )
        weights = bottleneck.concept_weights(concept)
        pooled = bottleneck.pooled(LayerInputs(hidden, kwargs, attention), weights)
        return bottleneck.concept_heads[concept][0](pooled)[0]


def _logits(model, bottleneck, embeds: torch.Tensor, concept: int) -> torch.Tensor:
    with torch.no_grad():
        return bottleneck.concept_heads[concept][1](_head_input(model, bottleneck, embeds, concept))


def _embeds(model, tokenizer) -> torch.Tensor:
    ids = tokenizer([TEXT], return_tensors="pt").input_ids
    return model.get_input_embeddings()(ids).detach()


def _scaled(embeds: torch.Tensor, position: int, factor: float) -> torch.Tensor:
    out = embeds.clone()
    out[0, position] *= factor
    return out


def test_one_normalised_score_per_token_and_concept_deterministic(setup) -> None:
    model, tokenizer, bottleneck = setup
    first = token_attributions(model, tokenizer, bottleneck, TEXT)
    assert list(first) == ["food", "service"]
    pieces = [tokenizer.decode([i]) for i in tokenizer(TEXT).input_ids]
    for scores in first.values():
        assert [token for token, _ in scores] == pieces
        assert max(abs(s) for _, s in scores) == 1.0
    assert first["food"] != first["service"]
    assert token_attributions(model, tokenizer, bottleneck, TEXT) == first


def test_a_score_is_the_logit_change_from_scaling_that_token(setup) -> None:
    """Gradient x input is the derivative of the predicted value's logit along the token's
    own embedding: checked against a central difference through the concept's pass."""
    model, tokenizer, bottleneck = setup
    _, raw = raw_attributions(model, tokenizer, bottleneck, TEXT)
    embeds, step = _embeds(model, tokenizer), 1e-2
    for concept in (0, 1):
        value = int(_logits(model, bottleneck, embeds, concept).argmax())

        def logit(position: int, factor: float, concept: int = concept, value: int = value):
            scaled = _scaled(embeds, position, factor)
            return float(_logits(model, bottleneck, scaled, concept)[value])

        expected = [
            (logit(p, 1 + step) - logit(p, 1 - step)) / (2 * step) for p in range(len(embeds[0]))
        ]
        assert raw[concept].tolist() == pytest.approx(expected, abs=2e-3)


def test_each_concept_is_attributed_through_its_own_masks(setup) -> None:
    model, tokenizer, bottleneck = setup
    before = token_attributions(model, tokenizer, bottleneck, TEXT)
    for mask in bottleneck.masks:
        mask[1] = mask[0]  # concept 1 ("service") now shares concept 0's mask
    after = token_attributions(model, tokenizer, bottleneck, TEXT)
    assert after["food"] == before["food"]
    assert after["service"] != before["service"]


def test_a_token_made_to_drive_a_concept_ranks_top(setup) -> None:
    """The "service" head's predicted value is set to read only what "city" does to its
    input: nothing of how scaling or zeroing any other token's embedding moves it. Zeroing
    "city" then changes that logit most (alone), and "city" must rank top; the wrong pass,
    head row or token position would leave other tokens scoring."""
    model, tokenizer, bottleneck = setup
    embeds, concept, value = _embeds(model, tokenizer), 1, 0

    def read(embedded: torch.Tensor) -> torch.Tensor:
        return _head_input(model, bottleneck, embedded, concept)

    full, step = read(embeds), 1e-2
    moves, zeroings = [], []
    for p in range(embeds.shape[1]):
        moves.append(read(_scaled(embeds, p, 1 + step)) - read(_scaled(embeds, p, 1 - step)))
        zeroings.append(read(_scaled(embeds, p, 0.0)) - full)
    others = [v for p, v in enumerate(moves + zeroings) if p % len(moves) != CITY]
    basis = torch.linalg.qr(torch.stack(others).T).Q
    reading = moves[CITY] - basis @ (basis.T @ moves[CITY])
    head = bottleneck.concept_heads[concept][1]
    with torch.no_grad():
        head.weight[value] = reading / reading.norm()
        head.bias[value] = 20.0  # the value the head predicts
        changes = [abs(float(head.weight[value] @ z)) for z in zeroings]
    assert max(range(len(changes)), key=changes.__getitem__) == CITY
    scores = token_attributions(model, tokenizer, bottleneck, TEXT)["service"]
    assert scores[CITY] == ("city", 1.0)
    assert all(abs(s) < 0.05 for i, (_, s) in enumerate(scores) if i != CITY)


def test_explain_with_an_intervention_attributes_the_steered_prediction(setup) -> None:
    model, tokenizer, bottleneck = setup
    plain = predict_concepts(model, tokenizer, bottleneck, [TEXT], explain=True)[0]
    assert plain.explain == token_attributions(model, tokenizer, bottleneck, TEXT)
    saved = [m.clone() for m in bottleneck.masks]
    other = next(v for v in CONCEPT_VALUES if v != plain.concepts["food"])
    steered = predict_concepts(model, tokenizer, bottleneck, [TEXT], [{"food": other}], True)[0]
    assert steered.concepts_before == plain.concepts and steered.explain is not None
    assert steered.explain["food"] != plain.explain["food"]  # the steered mask's pass
    assert steered.explain["service"] == plain.explain["service"]
    assert all(torch.equal(a, b) for a, b in zip(saved, bottleneck.masks, strict=True))
    assert predict_concepts(model, tokenizer, bottleneck, [TEXT])[0].explain is None
