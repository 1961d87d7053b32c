"""Activations of texts at the places representation-engineering methods read them: each
decoder layer's output (the residual stream after layer L) and each attention head's output
before the output projection. Hooks only read; the model is unchanged."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from modelsurgery.models.adapters import get_adapter

TokenChoice = Literal["last", "mean"]


def _encode(tokenizer: Any, texts: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ids and mask (so a row's last real token is at ``mask.sum() - 1``)."""
    rows = [tokenizer(text).input_ids for text in texts]
    if any(not row for row in rows):
        raise ValueError("a contrast text tokenizes to nothing")
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _pool(states: torch.Tensor, mask: torch.Tensor, token: TokenChoice) -> torch.Tensor:
    """(B, T, ...) -> (B, ...): the last real token, or the mean over real tokens."""
    mask = mask.to(states.device)  # a placed model's layers may sit on another device
    if token == "last":
        last = mask.sum(dim=1) - 1  # (B,)
        return states[torch.arange(states.shape[0], device=states.device), last]
    weights = mask.to(states.dtype).view(*mask.shape, *([1] * (states.dim() - 2)))
    return (states * weights).sum(dim=1) / weights.sum(dim=1)


@torch.no_grad()
def _collect(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    modules: list[nn.Module],
    read: Callable[[tuple[Any, ...], Any], torch.Tensor],
    pre: bool,
    token: TokenChoice,
    batch_size: int,
) -> torch.Tensor:
    """Run the texts batch by batch; one hook per module pools what ``read`` returns."""
    device = next(model.parameters()).device
    seen: list[torch.Tensor] = [torch.empty(0)] * len(modules)
    mask = torch.empty(0)

    def hook_for(slot: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], *rest: Any) -> None:
            seen[slot] = _pool(read(args, rest[0] if rest else None).float(), mask, token)

        return hook

    register = [m.register_forward_pre_hook if pre else m.register_forward_hook for m in modules]
    handles = [add(hook_for(i)) for i, add in enumerate(register)]
    out: list[torch.Tensor] = []
    try:
        for start in range(0, len(texts), batch_size):
            inputs = _encode(tokenizer, texts[start : start + batch_size], device)
            mask = inputs["attention_mask"]
            model(**inputs)
            out.append(torch.stack([s.cpu() for s in seen], dim=1))  # layers' own devices
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(out)


def residual_outputs(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    token: TokenChoice = "last",
    batch_size: int = 16,
) -> torch.Tensor:
    """Decoder layer outputs, float32, shape (N, len(layers), hidden)."""
    adapter = get_adapter(model)
    modules = [adapter.layer(layer) for layer in layers]

    def read(_args: tuple[Any, ...], output: Any) -> torch.Tensor:
        return output[0] if isinstance(output, tuple) else output  # (B, T, H)

    return _collect(model, tokenizer, texts, modules, read, False, token, batch_size)


def head_inputs(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    token: TokenChoice = "last",
    batch_size: int = 16,
) -> torch.Tensor:
    """Every head's output before the attention output projection, float32, shape
    (N, len(layers), heads, head_dim)."""
    adapter = get_adapter(model)
    modules = [adapter.attn_out(layer).module for layer in layers]

    def read(args: tuple[Any, ...], _output: Any) -> torch.Tensor:
        hidden = args[0]  # (B, T, heads * head_dim)
        return hidden.view(*hidden.shape[:2], adapter.num_heads, adapter.head_dim)

    return _collect(model, tokenizer, texts, modules, read, True, token, batch_size)
