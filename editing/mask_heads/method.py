"""Attention-head masking: zero chosen heads' columns of the attention output projection.

A head's contribution to the residual stream is ``W_o[:, cols(h)] @ z_h``; zeroing those columns
removes it exactly, for every input, and the result is an ordinary checkpoint (plain weights, no
hooks). With grouped-query attention the o_proj input is still laid out per *query* head, so a
single query head can be masked while the KV head it shares stays intact.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from modelsurgery.editing.mask_heads.config import MaskHeadsConfig
from modelsurgery.editing.registry import MethodContext, SurgeryResult
from modelsurgery.models.adapters import get_adapter


@torch.no_grad()
def mask_heads_in_place(
    model: torch.nn.Module, heads: Iterable[tuple[int, int]]
) -> dict[str, torch.Tensor]:
    """Zero each (layer, head)'s o_proj input columns; return the changed weights by
    state-dict name (the stored tensor, so Conv1D weights keep their [in, out] layout)."""
    adapter = get_adapter(model)
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    changed: dict[str, torch.Tensor] = {}
    for layer, layer_heads in sorted(by_layer.items()):
        projection = adapter.attn_out(layer)
        for head in layer_heads:
            projection.weight[:, adapter.head_columns(head)] = 0
        name = f"{adapter.attn_out_path(layer)}.weight"
        changed[name] = projection.module.weight.detach().clone()
    return changed


def run(
    model: torch.nn.Module, tokenizer: Any, config: MaskHeadsConfig, context: MethodContext
) -> SurgeryResult:
    context.check_cancelled()
    changed = mask_heads_in_place(model, config.parsed_heads())
    context.progress(f"masked {len(config.heads)} heads", step=1, total=1)
    return SurgeryResult(changed=changed, metrics={"heads_masked": float(len(config.heads))})
