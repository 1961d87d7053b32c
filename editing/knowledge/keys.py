"""Keys (down-projection inputs at the subject, averaged over context templates) and the
residual-stream output of a later layer at the bare prompt's subject, for many facts at once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from modelsurgery.models.adapters import ArchitectureAdapter

from . import tokens as tk
from .facts import Fact
from .runner import capture_input, capture_output, run_until_stopped
from .templates import prefix_length, with_bare_first


@torch.no_grad()
def keys_and_outputs(
    model: nn.Module,
    tokenizer: Any,
    adapter: ArchitectureAdapter,
    facts: Sequence[Fact],
    *,
    key_layer: int,
    out_layer: int,
    templates: Sequence[str],
    batch_facts: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([F, d_in] averaged keys at ``key_layer``, [F, d] outputs of ``out_layer``); only the
    layers up to ``out_layer`` run."""
    device = next(model.parameters()).device
    ordered = with_bare_first(tuple(templates))
    keys_out, outs_out = [], []
    for start in range(0, len(facts), batch_facts):
        chunk = facts[start : start + batch_facts]
        seqs = [
            tk.subject_prompt(tokenizer, t.replace("{}", fact.text), fact.subject, prefix_length(t))
            for fact in chunk
            for t in ordered
        ]
        ids, mask = tk.pad_batch(seqs, tk.pad_id_of(tokenizer))
        rows = torch.arange(len(seqs), device=device)
        cols = torch.tensor([s.lookup for s in seqs], device=device)
        got: dict[str, torch.Tensor] = {}
        with (
            capture_input(
                adapter.mlp_out(key_layer).module, lambda k, got=got: got.setdefault("k", k)
            ),
            capture_output(
                adapter.layer(out_layer), lambda h, got=got: got.setdefault("h", h), stop=True
            ),
        ):
            run_until_stopped(model, ids.to(device), mask.to(device))
        keys = got["k"][rows, cols].float().view(len(chunk), len(ordered), -1).mean(1)
        outs = got["h"][rows, cols].float().view(len(chunk), len(ordered), -1)[:, 0]
        keys_out.append(keys)
        outs_out.append(outs)
    return torch.cat(keys_out), torch.cat(outs_out)
