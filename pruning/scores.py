"""How much each weight matters, as a score matrix [out, in] (higher means keep).

``input_l2`` is ||X_j||_2 over the calibration tokens for input column j. The scores are
compared within one output row (``masks``), except where a refit chooses them block by block.
"""

from __future__ import annotations

import torch


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float()


def wanda_scores(weight: torch.Tensor, input_l2: torch.Tensor) -> torch.Tensor:
    """Wanda: |W_ij| * ||X_j||_2."""
    return magnitude_scores(weight) * input_l2.to(weight.device).float().unsqueeze(0)


def ria_scores(
    weight: torch.Tensor,
    input_l2: torch.Tensor,
    *,
    row_sums: torch.Tensor | None = None,
    column_sums: torch.Tensor | None = None,
) -> torch.Tensor:
    """RIA (Zhang et al., ICLR 2024): (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) *
    ||X_j||_2 ** 0.5, the relative importance within the weight's column and its row, so an
    input channel or output row with large weights everywhere does not take every slot.

    ``row_sums`` [out] / ``column_sums`` [in] give the sums of a larger matrix when ``weight``
    is a slice of it (a refit scores one block of columns of the whole matrix)."""
    w = magnitude_scores(weight)
    rows = w.sum(1) if row_sums is None else row_sums.float()
    cols = w.sum(0) if column_sums is None else column_sums.float()
    tiny = torch.finfo(torch.float32).tiny
    relative = w / cols.clamp_min(tiny).unsqueeze(0) + w / rows.clamp_min(tiny).unsqueeze(1)
    return relative * input_l2.to(weight.device).float().sqrt().unsqueeze(0)
