"""Predicting concepts and the label for texts with an attached bottleneck, optionally with
a user's corrections applied by intervention (the serving path: RPC, CLI, SDK)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelsurgery.editing.concepts.bottleneck import ConceptBottleneck, layer_inputs
from modelsurgery.editing.concepts.intervene import intervene


@dataclass
class ConceptPrediction:
    label: str
    concepts: dict[str, str]
    label_before: str | None = None  # with corrections: before the intervention
    concepts_before: dict[str, str] | None = None


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


def predict_concepts(
    model: nn.Module,
    tokenizer: Any,
    bottleneck: ConceptBottleneck,
    texts: Sequence[str],
    corrections: Sequence[Mapping[str, str] | None] | None = None,
) -> list[ConceptPrediction]:
    """One prediction per text; where ``corrections[i]`` is given, the intervened one with
    the plain prediction in the ``_before`` fields."""
    if corrections is not None and len(corrections) != len(texts):
        raise ValueError(
            f"corrections: {len(corrections)} entries for {len(texts)} texts (one per text)"
        )
    coded = [_coded(bottleneck, c or {}, i) for i, c in enumerate(corrections or [])]
    labels = bottleneck.spec.labels
    out = []
    for i, text in enumerate(texts):
        inputs = layer_inputs(
            model, tokenizer, [text], bottleneck.first, bottleneck.spec.max_tokens
        )
        with torch.no_grad():
            logits = bottleneck.concept_logits(inputs)
            label = labels[int(bottleneck.label_logits(logits).argmax(-1))]
        plain = ConceptPrediction(label, _named(bottleneck, logits))
        if corrections is None:
            out.append(plain)
            continue
        outcome = intervene(bottleneck, inputs, coded[i])
        out.append(
            ConceptPrediction(
                label=labels[int(outcome.label_logits.argmax(-1))],
                concepts=_named(bottleneck, outcome.concept_logits),
                label_before=plain.label,
                concepts_before=plain.concepts,
            )
        )
    return out
