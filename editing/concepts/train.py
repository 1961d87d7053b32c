"""Training the joint concept bottleneck: cached lower-layer inputs, loss = CE(label) +
lambda * sum_k CE(concept k), masks recomputed by saliency from the second epoch on."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from modelsurgery.editing.concepts.bottleneck import ConceptBottleneck, LayerInputs, layer_inputs
from modelsurgery.editing.concepts.data import MISSING, ConceptExample
from modelsurgery.editing.concepts.saliency import (
    fisher_saliency,
    magnitude_saliency,
    scheduled_sparsity,
    update_masks,
)


@dataclass
class Batch:
    inputs: LayerInputs
    labels: torch.Tensor  # [batch]
    concepts: torch.Tensor  # [batch, K], MISSING where unlabelled
    rows: list[int]  # indices into the examples the batch came from


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    lr: float
    backbone_lr: float
    concept_weight: float
    sparsity: float
    saliency: str
    fisher_batches: int
    seed: int


def make_batches(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[ConceptExample],
    first: int,
    max_tokens: int,
    batch_size: int,
    check_cancelled: Callable[[], None] = lambda: None,
) -> list[Batch]:
    """Batches of similar length (less padding) with the frozen layers already run."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].text))
    batches = []
    for start in range(0, len(order), batch_size):
        check_cancelled()
        rows = order[start : start + batch_size]
        chosen = [examples[i] for i in rows]
        batches.append(
            Batch(
                inputs=layer_inputs(model, tokenizer, [e.text for e in chosen], first, max_tokens),
                labels=torch.tensor([e.label for e in chosen]),
                concepts=torch.tensor([list(e.concepts) for e in chosen], dtype=torch.long),
                rows=rows,
            )
        )
    return batches


def batch_loss(bottleneck: ConceptBottleneck, batch: Batch, concept_weight: float) -> torch.Tensor:
    concept_logits = bottleneck.concept_logits(batch.inputs)
    label_logits = bottleneck.label_logits(concept_logits)
    loss = F.cross_entropy(label_logits, batch.labels.to(label_logits.device))
    for k, logits in enumerate(concept_logits):
        target = batch.concepts[:, k].to(logits.device)
        if (target != MISSING).any():
            loss = loss + concept_weight * F.cross_entropy(logits, target, ignore_index=MISSING)
    return loss


def _refresh_masks(
    bottleneck: ConceptBottleneck, batches: Sequence[Batch], settings: TrainSettings, epoch: int
) -> None:
    sparsity = scheduled_sparsity(settings.sparsity, epoch, settings.epochs)
    if bottleneck.masks is None or sparsity == 0.0:
        return
    if settings.saliency == "fisher":
        sample = [(b.inputs, b.concepts) for b in batches[: settings.fisher_batches]]
        saliency = fisher_saliency(bottleneck, sample)
    else:
        saliency = magnitude_saliency(bottleneck)
    update_masks(bottleneck, saliency, sparsity)


def train(
    bottleneck: ConceptBottleneck,
    batches: Sequence[Batch],
    settings: TrainSettings,
    progress: Callable[..., None],
    check_cancelled: Callable[[], None],
) -> float:
    """Train in place; the seconds it took."""
    started = time.perf_counter()
    heads = [*bottleneck.concept_heads.parameters(), *bottleneck.label_head.parameters()]
    groups = [{"params": heads, "lr": settings.lr}]
    if settings.backbone_lr > 0:
        groups.append({"params": list(bottleneck.weights), "lr": settings.backbone_lr})
    else:
        bottleneck.weights.requires_grad_(False)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    rng = random.Random(settings.seed)
    order = list(range(len(batches)))
    total, step = settings.epochs * len(batches), 0
    for epoch in range(settings.epochs):
        rng.shuffle(order)
        _refresh_masks(bottleneck, [batches[i] for i in order], settings, epoch)
        for index in order:
            check_cancelled()
            loss = batch_loss(bottleneck, batches[index], settings.concept_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            progress("train", step=step, total=total, epoch=epoch + 1, loss=float(loss.detach()))
    return time.perf_counter() - started


@dataclass
class Predictions:
    concepts: torch.Tensor  # [N, K] predicted value indices
    labels: torch.Tensor  # [N]


@torch.no_grad()
def predict(bottleneck: ConceptBottleneck, batches: Sequence[Batch], count: int) -> Predictions:
    """Predictions in the examples' order (batches are length-sorted)."""
    concepts = torch.zeros((count, len(bottleneck.concept_heads)), dtype=torch.long)
    labels = torch.zeros(count, dtype=torch.long)
    for batch in batches:
        logits = bottleneck.concept_logits(batch.inputs)
        rows = torch.tensor(batch.rows)
        concepts[rows] = torch.stack([c.argmax(-1).cpu() for c in logits], dim=1)
        labels[rows] = bottleneck.label_logits(logits).argmax(-1).cpu()
    return Predictions(concepts, labels)


def new_bottleneck(spec: Any, model: nn.Module, seed: int) -> ConceptBottleneck:
    """Heads initialised from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ConceptBottleneck(spec, model)
