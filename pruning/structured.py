"""Structured importance: which MLP neurons and which KV head groups of a layer to keep.

Removing neuron j of an MLP changes the layer output by ``W_down[:, j] * h_j`` per token, so its
expected squared error is ``||W_down[:, j]||^2 * E[h_j^2]`` (``wanda``), or with bias
compensation (the mean removed contribution folded into the bias, FLAP) ``... * Var(h_j)``.
``activation`` uses ``E|h_j| * ||W_down[:, j]||``; ``magnitude`` ignores activations.
"""

from __future__ import annotations

import torch
from torch import nn

from modelsurgery.models.adapters import ArchitectureAdapter, Projection
from modelsurgery.pruning.calibration import InputStats


def _rows_norm_sq(module: nn.Module, conv1d: bool) -> torch.Tensor:
    w = Projection(module, conv1d).weight.detach().float()
    return w.square().sum(1)


def column_scores(
    out_weight: torch.Tensor, stats: InputStats | None, score: str, centered: bool
) -> torch.Tensor:
    """Score of each input column of an output projection ([out, in] weight)."""
    col_norm = out_weight.detach().float().norm(dim=0)
    if score == "magnitude" or stats is None:
        return col_norm
    if score == "activation":
        return stats.mean_abs() * col_norm
    second = stats.rms().square()
    if centered:
        second = (second - stats.mean().square()).clamp_min(0)
    return second.sqrt() * col_norm


def neuron_scores(
    adapter: ArchitectureAdapter, index: int, stats: InputStats | None, score: str, centered: bool
) -> torch.Tensor:
    """Importance of every MLP intermediate neuron of layer ``index`` (higher = keep)."""
    down = adapter.mlp_out(index).weight
    if score != "magnitude":
        return column_scores(down, stats, score, centered)
    total = down.detach().float().square().sum(0)
    for module in adapter.mlp_in(index):
        total = total + _rows_norm_sq(module, adapter.layout.conv1d)
    return total.sqrt()


def kv_group_scores(
    adapter: ArchitectureAdapter, index: int, stats: InputStats | None, score: str
) -> torch.Tensor:
    """Importance of each KV head group (a KV head plus the query heads that read it)."""
    o_weight = adapter.attn_out(index).weight
    per_column = column_scores(o_weight, stats, score, centered=False).square()
    if score == "magnitude":
        qkv = adapter.attn_qkv(index)
        group = adapter.num_heads // adapter.num_kv_heads
        q_rows = _rows_norm_sq(qkv["q"], False).view(adapter.num_heads, -1).sum(1)
        kv_rows = sum(_rows_norm_sq(qkv[k], False) for k in ("k", "v"))
        kv = kv_rows.view(adapter.num_kv_heads, -1).sum(1)  # type: ignore[union-attr]
        heads = per_column.view(adapter.num_heads, -1).sum(1) + q_rows
        return heads.view(adapter.num_kv_heads, group).sum(1) + kv
    heads = per_column.view(adapter.num_heads, adapter.head_dim).sum(1)
    return heads.view(adapter.num_kv_heads, -1).sum(1)


def top_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, in ascending index order."""
    return torch.topk(scores, keep).indices.sort().values


def compensation_bias(
    out_weight: torch.Tensor, stats: InputStats, keep: torch.Tensor
) -> torch.Tensor:
    """``W[:, removed] @ E[h_removed]``: the mean output of the removed inputs, which a bias can
    carry on (FLAP's bias compensation)."""
    removed = torch.ones(out_weight.shape[1], dtype=torch.bool, device=out_weight.device)
    removed[keep.to(out_weight.device)] = False
    w = out_weight.detach()[:, removed].float()
    return w @ stats.mean().to(w.device)[removed]
