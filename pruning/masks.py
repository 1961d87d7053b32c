"""Which weights to zero: per-row unstructured and N:M masks from a score matrix.

Scores are [out, in]; higher means keep. Both masks compare weights only within one output row
(Wanda's comparison group), so every row ends up with exactly the asked sparsity.
"""

from __future__ import annotations

import torch


def row_prune_mask_count(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True where a weight is removed: the ``k`` lowest scores of each row."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k == 0:
        return mask
    lowest = torch.topk(scores, k, dim=1, largest=False).indices
    return mask.scatter_(1, lowest, True)


def row_prune_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """True where a weight is removed: the ``round(ratio * in)`` lowest scores of each row."""
    return row_prune_mask_count(scores, round(ratio * scores.shape[1]))


def nm_prune_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where a weight is removed: the ``n`` lowest of every ``m`` consecutive inputs."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"m: M={m} does not divide the input size {cols}")
    groups = scores.reshape(rows, cols // m, m)
    lowest = torch.topk(groups, n, dim=2, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, lowest, True)
    return mask.reshape(rows, cols)
