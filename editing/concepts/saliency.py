"""Recomputing the concept masks from the dense weights: diagonal-Fisher (oBERT's CPU form)
or magnitude saliency, and the sparsity schedule."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from modelsurgery.editing.concepts.bottleneck import ConceptBottleneck, LayerInputs
from modelsurgery.editing.concepts.data import MISSING


def scheduled_sparsity(final: float, epoch: int, epochs: int) -> float:
    """The sparsity epoch ``epoch`` (0-based) trains at: dense first, then rising linearly
    to ``final`` in the last epoch."""
    if epoch == 0 or epochs < 2:
        return 0.0 if epochs >= 2 else final
    return final * epoch / (epochs - 1)


def fisher_saliency(
    bottleneck: ConceptBottleneck, batches: Sequence[tuple[LayerInputs, torch.Tensor]]
) -> list[torch.Tensor]:
    """Per masked weight [K, *shape]: w^2 * E[g_k^2] / 2, g_k the gradient of concept k's loss
    at its masked weights (the pass reads W * M_k, so pruned entries get a gradient too)."""
    squares = [torch.zeros((len(bottleneck.concept_heads), *w.shape)) for w in bottleneck.weights]
    tracked = [w.requires_grad for w in bottleneck.weights]
    bottleneck.weights.requires_grad_(True)  # frozen weights (backbone_lr 0) still get a g
    try:
        _accumulate(bottleneck, batches, squares)
    finally:
        for weight, flag in zip(bottleneck.weights, tracked, strict=True):
            weight.requires_grad_(flag)
    count = max(1, len(batches))
    return [
        w.detach().float().cpu().square().unsqueeze(0) * (s / count) / 2  # s is on the CPU
        for w, s in zip(bottleneck.weights, squares, strict=True)
    ]


def _accumulate(
    bottleneck: ConceptBottleneck,
    batches: Sequence[tuple[LayerInputs, torch.Tensor]],
    squares: list[torch.Tensor],
) -> None:
    for inputs, concept_targets in batches:
        effective: list[list[torch.Tensor]] = []
        logits = bottleneck.concept_logits(inputs, effective)
        losses = []
        for k, concept_logit in enumerate(logits):
            target = concept_targets[:, k].to(concept_logit.device)
            if (target != MISSING).any():
                losses.append(F.cross_entropy(concept_logit, target, ignore_index=MISSING))
        if not losses:
            continue
        flat = [w for per_concept in effective for w in per_concept]
        grads = torch.autograd.grad(sum(losses), flat, allow_unused=True)
        per = len(bottleneck.weights)
        for index, grad in enumerate(grads):
            if grad is not None:
                squares[index % per][index // per] += grad.detach().float().square().cpu()


def magnitude_saliency(bottleneck: ConceptBottleneck) -> list[torch.Tensor]:
    k = len(bottleneck.concept_heads)
    return [w.detach().float().abs().unsqueeze(0).expand(k, *w.shape) for w in bottleneck.weights]


def top_mask(saliency: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per row of ``saliency`` ([K, ...]) keep the highest ``1 - sparsity`` share."""
    flat = saliency.flatten(1)
    keep = flat.shape[1] - round(sparsity * flat.shape[1])
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if keep > 0:
        mask.scatter_(1, flat.topk(keep, dim=1).indices, True)
    return mask.view_as(saliency)


def update_masks(
    bottleneck: ConceptBottleneck, saliency: list[torch.Tensor], sparsity: float
) -> None:
    assert bottleneck.masks is not None
    bottleneck.set_masks([top_mask(s, sparsity) for s in saliency])
