"""A direction from paired activations: the mean difference (activation addition, Turner et
al. 2023; contrastive activation addition, Rimsky et al. 2024) or the first principal
component of the differences (representation engineering, Zou et al. 2023)."""

from __future__ import annotations

from typing import Literal

import torch

Aggregate = Literal["mean", "pca"]


def contrast_direction(
    positive: torch.Tensor, negative: torch.Tensor, aggregate: Aggregate = "mean"
) -> torch.Tensor:
    """positive, negative: (N, ..., D) activations of the pairs' two sides -> (..., D).

    ``mean``: the mean of the differences, with its natural scale. ``pca``: the top right
    singular vector of the differences, uncentred (every difference points positive minus
    negative, so centring would remove the very direction sought; repeng centres only after
    flipping random pairs), signed toward the mean difference and scaled to the mean
    difference's length along it, so one coefficient means the same for both.
    """
    diffs = (positive - negative).double()  # (N, ..., D)
    mean = diffs.mean(dim=0)  # (..., D)
    if aggregate == "mean":
        return mean.float()
    flat = diffs.reshape(diffs.shape[0], -1, diffs.shape[-1]).transpose(0, 1)  # (S, N, D)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)  # vh: (S, min(N, D), D)
    top = vh[:, 0]  # (S, D), unit rows
    along = (top * mean.reshape(-1, mean.shape[-1])).sum(dim=-1, keepdim=True)  # (S, 1)
    # Sign toward the mean difference; length = the mean difference's projection on it.
    return (top * along).reshape(mean.shape).float()


def projections(activations: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Scalar projection of each activation on the unit direction: (N, ..., D) -> (N, ...)."""
    unit = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (activations * unit).sum(dim=-1)
