"""Refit the weights a mask keeps so the layer still gives its dense outputs (SparseGPT).

For y = W x over calibration inputs X, removing weights and updating the kept ones to minimise
||W X - W' X||^2 is the optimal-brain-surgeon problem with Hessian H = X^T X. Taking the columns
in order, the error of zeroing column i's pruned entries is spread over the columns after it
through the upper Cholesky factor U of H^-1 (Frantar & Alistarh, 2023): one pass, no per-row
solve. Columns go in lazy blocks: inside a block each column updates only the block, and the
block's accumulated error updates the rest with one matrix product. The mask is chosen block by
block (N:M 32 columns at a time) from the score on the already updated weights, so later choices see
earlier corrections; zeros it sets stay exactly zero.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from modelsurgery.pruning.masks import nm_prune_mask, row_prune_mask_count
from modelsurgery.pruning.scores import ria_scores, wanda_scores

BLOCK = 128
SELECT = 32


@dataclass(frozen=True)
class Sparsity:
    """What each row loses: ``ratio`` of its inputs (unstructured) or ``n`` of every ``m``."""

    ratio: float = 0.0
    n: int = 0
    m: int = 0

    def block(self) -> int:
        """A lazy block size that holds whole N:M groups."""
        return -(-BLOCK // self.m) * self.m if self.m else BLOCK

    def selection(self) -> int:
        """How many columns one N:M mask choice covers: whole groups, a few at once (one
        choice per group costs more in dispatch than the whole update on a CPU)."""
        return -(-SELECT // self.m) * self.m

    def removed_before(self, column: int) -> int:
        return round(self.ratio * column)


def importance(score: str, weight: torch.Tensor, input_l2: torch.Tensor) -> torch.Tensor:
    """What |W_ij| is multiplied by in ``score`` ([out, in]), fixed from the dense weight and
    inputs, so the updated weights of any block are scored as |W| * importance."""
    ones = torch.ones_like(weight, dtype=torch.float32)
    if score == "magnitude":
        return ones
    if score == "wanda":
        return wanda_scores(ones, input_l2)
    if score == "ria":
        absolute = weight.detach().abs().float()
        return ria_scores(ones, input_l2, row_sums=absolute.sum(1), column_sums=absolute.sum(0))
    raise ValueError(f"score: {score!r} cannot choose a mask for a refit")


def inverse_hessian_factor(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of (X^T X + damping * mean(diag) * I)^-1, in float64. Inputs that
    are always zero get a unit diagonal (their weights never reach the outputs); a matrix left
    indefinite by rounding is retried with ten times the damping, up to three times."""
    h = gram.to(torch.float64).clone()
    diagonal = h.diagonal()
    diagonal[diagonal == 0] = 1.0
    base = diagonal.mean()
    for attempt in range(4):  # more damping where rounding left the matrix indefinite
        try:
            damped = h + torch.eye(h.shape[0], dtype=h.dtype, device=h.device) * (
                damping * 10**attempt * base
            )
            inverse = torch.cholesky_inverse(torch.linalg.cholesky(damped))
            return torch.linalg.cholesky(inverse, upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise ValueError("refit_damping: the Gram matrix stays singular; raise refit_damping")


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """The column loop is thousands of tiny operations: on a CPU, several intra-op threads
    only wait on each other (13x slower measured with 2 threads on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def refit_weight(
    weight: torch.Tensor,
    factor: torch.Tensor,
    sparsity: Sparsity,
    weight_importance: torch.Tensor,
) -> torch.Tensor:
    """Prune ``weight`` ([out, in], written in place) and refit what it keeps; returns the
    mask (True where removed). ``factor`` is ``inverse_hessian_factor`` of its inputs; a
    weight's score is |W_ij| (as updated so far) * ``weight_importance``."""
    w = weight.detach().float().clone()
    u = factor.to(device=w.device, dtype=torch.float32)
    mask = torch.zeros_like(w, dtype=torch.bool)
    with _one_cpu_thread(w.device):
        _sweep(w, u, mask, sparsity, weight_importance)
    weight.copy_(w.masked_fill(mask, 0.0).to(weight.dtype))  # exact zeros, not rounding's
    return mask


def _sweep(
    w: torch.Tensor,
    u: torch.Tensor,
    mask: torch.Tensor,
    sparsity: Sparsity,
    weight_importance: torch.Tensor,
) -> None:
    """The column-by-column OBS pass over ``w`` in place, filling ``mask``."""
    columns = w.shape[1]
    step = sparsity.block()
    for i1 in range(0, columns, step):
        i2 = min(i1 + step, columns)
        block, u_block = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        block_importance = weight_importance[:, i1:i2].to(w.device)
        errors = torch.zeros_like(block)
        block_mask = mask[:, i1:i2]
        scale = torch.zeros_like(block)  # 1 / U_ii where a weight goes, else 0
        if not sparsity.m:
            count = sparsity.removed_before(i2) - sparsity.removed_before(i1)
            scores = block.abs() * block_importance
            block_mask.copy_(row_prune_mask_count(scores, count))
            scale = block_mask / u_block.diagonal()
        for i in range(i2 - i1):
            if sparsity.m and i % sparsity.selection() == 0:
                group = slice(i, min(i + sparsity.selection(), i2 - i1))
                scores = block[:, group].abs() * block_importance[:, group]
                block_mask[:, group] = nm_prune_mask(scores, sparsity.n, sparsity.m)
                scale[:, group] = block_mask[:, group] / u_block.diagonal()[group]
            error = block[:, i] * scale[:, i]
            errors[:, i] = error
            block[:, i:].addr_(error, u_block[i, i:], alpha=-1.0)
        w[:, i1:i2] = block
        w[:, i2:] -= errors @ u[i1:i2, i2:]
