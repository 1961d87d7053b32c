"""Inference-time intervention (SparseCBM): where a predicted concept disagrees with the value
a user gives, the gradient of that concept's loss at its mask swaps part of the mask (prune
the kept entries whose removal helps most, regrow as many pruned ones whose return helps
most; sparsity unchanged), the input is re-run, and the masks are restored."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from modelsurgery.editing.concepts.bottleneck import ConceptBottleneck, LayerInputs

SWAP_FRACTION = 0.3
SWAP_STEPS = 3


@dataclass
class Outcome:
    concept_logits: list[torch.Tensor]  # per concept [1, values]
    label_logits: torch.Tensor  # [1, labels]
    swapped: dict[int, int]  # concept -> mask entries swapped (pruned = regrown)


def swap_entries(mask: torch.Tensor, grad: torch.Tensor, count: int) -> int:
    """Prune up to ``count`` kept entries with the largest loss gradient (removing them lowers
    the loss most, to first order) and regrow as many pruned entries with the most negative
    one, pairing them only while the pair lowers the loss. In place; the pairs swapped."""
    flat_mask, flat_grad = mask.view(-1), grad.reshape(-1).float()
    kept = int(flat_mask.sum())
    count = min(count, kept, flat_mask.numel() - kept)
    if count <= 0:
        return 0
    # Scores over the whole matrix with the other side at -inf (no index lists: faster).
    outside = torch.tensor(float("-inf"), device=flat_grad.device)
    prune_gain, prune_at = torch.where(flat_mask, flat_grad, outside).topk(count)
    regrow_gain, regrow_at = torch.where(flat_mask, outside, -flat_grad).topk(count)
    pairs = int(((prune_gain + regrow_gain) > 0).sum())
    flat_mask[prune_at[:pairs]] = False
    flat_mask[regrow_at[:pairs]] = True
    return pairs


def _concept_pass(
    bottleneck: ConceptBottleneck, inputs: LayerInputs, concept: int, masks: Sequence[torch.Tensor]
) -> torch.Tensor:
    weights = bottleneck.concept_weights(concept, masks)
    return bottleneck.concept_heads[concept](bottleneck.pooled(inputs, weights))


def steer_mask(
    bottleneck: ConceptBottleneck,
    inputs: LayerInputs,
    concept: int,
    target: int,
    fraction: float = SWAP_FRACTION,
    steps: int = SWAP_STEPS,
) -> int:
    """Swap at most ``fraction`` of each of concept ``concept``'s kept mask entries, over up to
    ``steps`` gradient steps, until its head predicts ``target`` on ``inputs`` (one text).
    Changes ``bottleneck.masks`` in place; the entries swapped."""
    if bottleneck.masks is None:
        raise ValueError(
            "intervention needs a sparse concept bottleneck (a dense one has no masks)"
        )
    if inputs.hidden.shape[0] != 1:
        raise ValueError("intervention acts on one input at a time")
    masks = [m[concept] for m in bottleneck.masks]
    budgets = [int(fraction * int(m.sum())) for m in masks]
    used = [0] * len(masks)
    target_tensor = torch.tensor([target], device=inputs.hidden.device)
    total = 0
    for _ in range(steps):
        floats = [m.float().requires_grad_(True) for m in masks]
        with torch.enable_grad():
            logits = _concept_pass(bottleneck, inputs, concept, floats)
            if int(logits.argmax(-1)) == target:
                break
            grads = torch.autograd.grad(F.cross_entropy(logits, target_tensor), floats)
        for j, (mask, grad) in enumerate(zip(masks, grads, strict=True)):
            room = min(math.ceil(budgets[j] / steps), budgets[j] - used[j])
            swapped = swap_entries(mask, grad.detach(), room)
            used[j] += swapped
            total += swapped
    return total


@contextmanager
def steered(
    bottleneck: ConceptBottleneck,
    inputs: LayerInputs,
    corrections: Mapping[int, int],
    fraction: float = SWAP_FRACTION,
    steps: int = SWAP_STEPS,
) -> Iterator[dict[int, int]]:
    """Each corrected concept's mask steered towards the given value while the block runs
    (concepts already predicted as given are left alone), restored after; yields the entries
    swapped per concept. A block, not a result: whatever reads the steered bottleneck
    (the re-run prediction, token attributions) runs inside it."""
    if bottleneck.masks is None:
        raise ValueError(
            "intervention needs a sparse concept bottleneck (a dense one has no masks)"
        )
    saved = [m.clone() for m in bottleneck.masks]
    try:
        with torch.no_grad():
            before = bottleneck.concept_logits(inputs)
        swapped: dict[int, int] = {}
        for concept, target in corrections.items():
            if int(before[concept].argmax(-1)) != target:
                swapped[concept] = steer_mask(bottleneck, inputs, concept, target, fraction, steps)
        yield swapped
    finally:
        bottleneck.masks = saved


def intervene(
    bottleneck: ConceptBottleneck,
    inputs: LayerInputs,
    corrections: Mapping[int, int],
    fraction: float = SWAP_FRACTION,
    steps: int = SWAP_STEPS,
) -> Outcome:
    """Re-run one input with each corrected concept's mask steered towards the given value
    (concepts already predicted as given are left alone); the masks are restored after."""
    with steered(bottleneck, inputs, corrections, fraction, steps) as swapped, torch.no_grad():
        logits = bottleneck.concept_logits(inputs)
        label = bottleneck.label_logits(logits)
    return Outcome(logits, label, swapped)
