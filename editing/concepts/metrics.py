"""Task and concept figures of a concept bottleneck's predictions."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from modelsurgery.editing.concepts.data import MISSING


def accuracy(predicted: torch.Tensor, gold: torch.Tensor) -> float:
    keep = gold != MISSING
    if not keep.any():
        return float("nan")
    return float((predicted[keep] == gold[keep]).float().mean())


def macro_f1(predicted: torch.Tensor, gold: torch.Tensor) -> float:
    """Mean F1 over the classes that occur in the gold or the predicted labels."""
    scores = []
    for cls in torch.unique(torch.cat([predicted, gold])).tolist():
        tp = int(((predicted == cls) & (gold == cls)).sum())
        fp = int(((predicted == cls) & (gold != cls)).sum())
        fn = int(((predicted != cls) & (gold == cls)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores) if scores else float("nan")


def prediction_metrics(
    concept_names: Sequence[str],
    concepts: torch.Tensor,
    labels: torch.Tensor,
    gold_concepts: torch.Tensor,
    gold_labels: torch.Tensor,
) -> dict[str, float]:
    out = {
        "task_accuracy": accuracy(labels, gold_labels),
        "task_macro_f1": macro_f1(labels, gold_labels),
    }
    per = [accuracy(concepts[:, k], gold_concepts[:, k]) for k in range(len(concept_names))]
    for name, value in zip(concept_names, per, strict=True):
        out[f"concept_accuracy_{name}"] = value
    scored = [v for v in per if v == v]
    out["concept_accuracy_mean"] = sum(scored) / len(scored) if scored else float("nan")
    return out
