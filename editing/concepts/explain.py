"""Token attributions per concept: SparseCBM's input level of explanation (which input tokens
drive each concept), next to the subnetwork level (the masks) and the concept level (the
bottleneck).

What is attributed: gradient x input on the input token embeddings, summed over the hidden
dimension, of the predicted value's logit of concept k's head, taken through concept k's own
masked pass (``W * M_k`` in the masked layers, as its prediction is made). The paper names
this level (input tokens, per concept, through the sparse subnetworks), but the part of its
text that could be read here gives no formula, and the public code (Zhen-Tan-dmml/SparseCBM)
has no token-level code at all, so the estimator is ours, chosen for these reasons:
- it runs through the concept's own subnetwork, so it explains the pass that made the
  prediction (each concept its own), not the dense model;
- gradient x input is the first-order estimate of what zeroing a token's embedding does to
  that logit, with a sign: positive pushes towards the predicted value, negative away;
- the logit, not the probability: softmax saturation would flatten confident predictions;
- one backward pass per concept, the frozen lower layers included (the masked pass alone
  would only reach the cached hidden states, not the tokens).
Scores are divided per concept by their largest magnitude (1.0 marks the strongest token).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelsurgery.editing.concepts.bottleneck import (
    ConceptBottleneck,
    LayerInputs,
    encode,
    first_layer_input,
)

DECIMALS = 4

TokenScores = list[tuple[str, float]]


def _normalised(scores: torch.Tensor) -> list[float]:
    """Divided by the largest magnitude (all zeros stay zeros), rounded for display."""
    peak = float(scores.abs().max())
    if peak == 0.0:
        return [0.0] * scores.numel()
    return [round(float(s) / peak, DECIMALS) for s in scores]


def raw_attributions(
    model: nn.Module, tokenizer: Any, bottleneck: ConceptBottleneck, text: str
) -> tuple[list[int], list[torch.Tensor]]:
    """The token ids of ``text`` (cut to the bottleneck's ``max_tokens``) and, per concept,
    the unnormalised gradient x input score of each token [tokens]."""
    device = next(model.parameters()).device
    encoded = encode(tokenizer, [text], bottleneck.spec.max_tokens)
    ids = encoded.input_ids.to(device)
    attention = encoded.attention_mask.to(device)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    scores = []
    with torch.enable_grad():
        hidden, kwargs = first_layer_input(
            model, bottleneck.first, inputs_embeds=embeds, attention_mask=attention
        )
        inputs = LayerInputs(hidden, kwargs, attention)
        # A dense bottleneck has one pass for all heads; a sparse one a pass per concept.
        dense = None
        if bottleneck.masks is None:
            dense = bottleneck.pooled(inputs, bottleneck.concept_weights(0))
        for k, head in enumerate(bottleneck.concept_heads):
            if dense is None:
                logits = head(bottleneck.pooled(inputs, bottleneck.concept_weights(k)))[0]
            else:
                logits = head(dense)[0]
            (grad,) = torch.autograd.grad(logits[logits.argmax()], embeds, retain_graph=True)
            scores.append((grad * embeds).float().sum(-1)[0].detach())
    return ids[0].tolist(), scores


def token_attributions(
    model: nn.Module, tokenizer: Any, bottleneck: ConceptBottleneck, text: str
) -> dict[str, TokenScores]:
    """Per concept, each token of ``text`` as the tokenizer decodes it alone, with its
    normalised score (in [-1, 1]) for the value the concept's pass predicts now (with a
    steered mask in place: the prediction after the intervention)."""
    ids, scores = raw_attributions(model, tokenizer, bottleneck, text)
    tokens = [tokenizer.decode([i]) for i in ids]
    return {
        name: list(zip(tokens, _normalised(s), strict=True))
        for name, s in zip(bottleneck.spec.concepts, scores, strict=True)
    }
