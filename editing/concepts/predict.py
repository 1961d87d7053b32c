"""Predicting concepts and the label for texts with an attached bottleneck, optionally with
a user's corrections applied by intervention (the serving path: RPC, CLI, SDK)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelsurgery.editing.concepts.bottleneck import ConceptBottleneck, LayerInputs, layer_inputs
from modelsurgery.editing.concepts.explain import TokenScores, token_attributions
from modelsurgery.editing.concepts.intervene import steered


@dataclass
class ConceptPrediction:
    label: str
    concepts: dict[str, str]
    label_before: str | None = None  # with corrections: before the intervention
    concepts_before: dict[str, str] | None = None
    # With explain: per concept, (token, normalised score) for the prediction given above.
    explain: dict[str, TokenScores] | None = None


def _coded(
    bottleneck: ConceptBottleneck, correction: Mapping[str, str], index: int
) -> dict[int, int]:
    spec = bottleneck.spec
    coded = {}
    for name, value in correction.items():
        if name not in spec.concepts:
            raise ValueError(
                f"corrections[{index}]: unknown concept {name!r} "
                f"(the bottleneck has {', '.join(spec.concepts)})"
            )
        if value not in spec.values:
            raise ValueError(
                f"corrections[{index}].{name}: must be one of {', '.join(spec.values)}"
            )
        coded[spec.concepts.index(name)] = spec.values.index(value)
    return coded


def _named(bottleneck: ConceptBottleneck, logits: Sequence[torch.Tensor]) -> dict[str, str]:
    spec = bottleneck.spec
    return {
        name: spec.values[int(c.argmax(-1))] for name, c in zip(spec.concepts, logits, strict=True)
    }


def _predicted(bottleneck: ConceptBottleneck, inputs: LayerInputs) -> tuple[str, dict[str, str]]:
    with torch.no_grad():
        logits = bottleneck.concept_logits(inputs)
        label = bottleneck.spec.labels[int(bottleneck.label_logits(logits).argmax(-1))]
    return label, _named(bottleneck, logits)


def predict_concepts(
    model: nn.Module,
    tokenizer: Any,
    bottleneck: ConceptBottleneck,
    texts: Sequence[str],
    corrections: Sequence[Mapping[str, str] | None] | None = None,
    explain: bool = False,
) -> list[ConceptPrediction]:
    """One prediction per text; where ``corrections[i]`` is given, the intervened one with
    the plain prediction in the ``_before`` fields. ``explain`` adds token attributions per
    concept (``explain.token_attributions``) of the prediction returned: after the
    intervention where there is one."""
    if corrections is not None and len(corrections) != len(texts):
        raise ValueError(
            f"corrections: {len(corrections)} entries for {len(texts)} texts (one per text)"
        )
    coded = [_coded(bottleneck, c or {}, i) for i, c in enumerate(corrections or [])]
    out = []
    for i, text in enumerate(texts):
        inputs = layer_inputs(
            model, tokenizer, [text], bottleneck.first, bottleneck.spec.max_tokens
        )
        label, concepts = _predicted(bottleneck, inputs)
        if corrections is None:
            attributions = (
                token_attributions(model, tokenizer, bottleneck, text) if explain else None
            )
            out.append(ConceptPrediction(label, concepts, explain=attributions))
            continue
        with steered(bottleneck, inputs, coded[i]):
            steered_label, steered_concepts = _predicted(bottleneck, inputs)
            attributions = (
                token_attributions(model, tokenizer, bottleneck, text) if explain else None
            )
        out.append(
            ConceptPrediction(
                label=steered_label,
                concepts=steered_concepts,
                label_before=label,
                concepts_before=concepts,
                explain=attributions,
            )
        )
    return out
