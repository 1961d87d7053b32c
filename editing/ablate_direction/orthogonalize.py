"""Weight orthogonalisation (Arditi et al. 2024, sec. 2.4): remove one direction from everything
that writes into the residual stream, so no layer's output ever has a component along it.

The residual stream after layer L is a sum of writes: token (and learned position) embeddings,
then each layer's attention output projection and MLP output projection. With unit d, replacing
every writer W by (I - d d^T) W (and each bias b by b - (b.d) d) makes every summand, hence the
sum, orthogonal to d for any input. It equals the activation-space ablation x <- x - (x.d) d
applied to every write, as plain weights. What reads the stream (norms, q/k/v, MLP inputs, the
unembedding) is left alone; the readers see the same stream minus its d component.

Tied embeddings: with ``tie_word_embeddings`` the unembedding is the embedding matrix, so
orthogonalising the embedding would also remove d from the unembedding, an edit that the
activation ablation does not make: the final norm's elementwise gain puts part of d back into the
normed stream, and the logits would change through that too. The head is therefore untied: it
keeps the original matrix as its own tensor (``lm_head.weight``, stored with the version) and the
exported config says ``tie_word_embeddings: False``.

Refused: families that normalise a sublayer's output before adding it to the stream (Gemma 2/3
post-attention and post-feedforward norms) or the stream itself after each layer (post-LN OPT):
their elementwise norm gains would put d back, so no weight edit removes it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modelsurgery.models.adapters import get_adapter

# model_type -> why weight orthogonalisation cannot remove a direction from its residual stream
_NORMED_WRITES = {
    "gemma2": "normalises each sublayer's output before adding it to the residual stream",
    "gemma3_text": "normalises each sublayer's output before adding it to the residual stream",
}


def unsupported_reason(model_config: Any) -> str | None:
    """Why this architecture's residual stream cannot be orthogonalised by weights, or None."""
    model_type = getattr(model_config, "model_type", None)
    if model_type in _NORMED_WRITES:
        return f"{model_type} {_NORMED_WRITES[model_type]}"
    if getattr(model_config, "do_layer_norm_before", True) is False:
        return f"{model_type} normalises the residual stream after every layer (post-LN)"
    return None


@dataclass
class Orthogonalised:
    """Tensors changed (full state-dict names), HF config keys to change on export, and the
    value (layers,) each layer's output is held at along d (zeros unless mean-filled)."""

    changed: dict[str, torch.Tensor] = field(default_factory=dict)
    config_overrides: dict[str, Any] = field(default_factory=dict)
    held: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))


@torch.no_grad()
def _remove_from_outputs(weight: torch.Tensor, unit: torch.Tensor) -> None:
    """W <- (I - d d^T) W for a weight [out = hidden, in] (a view writes through)."""
    w, unit = weight.double(), unit.to(weight.device)
    weight.copy_(w - torch.outer(unit, unit @ w))


@torch.no_grad()
def _remove_from_rows(table: torch.Tensor, unit: torch.Tensor) -> None:
    """e <- e - (e.d) d for every row of an embedding table [rows, hidden] (or a bias)."""
    t, unit = table.double(), unit.to(table.device)
    table.copy_(t - (t @ unit).unsqueeze(-1) * unit)


def _untie_head(model: nn.Module, embed: nn.Module, names: dict[nn.Module, str]) -> str | None:
    """Give a head tied to ``embed`` its own copy of the matrix; its tensor name, or None."""
    head = get_adapter(model).lm_head()
    if head.weight is not embed.weight:
        return None
    original = embed.weight
    head.weight = nn.Parameter(original.detach().clone(), requires_grad=original.requires_grad)
    model.config.tie_word_embeddings = False
    return f"{names[head]}.weight"


def orthogonalise_in_place(model: nn.Module, direction: torch.Tensor) -> Orthogonalised:
    """Remove ``direction`` (hidden,) from every residual-stream writer of ``model``."""
    reason = unsupported_reason(model.config)
    if reason is not None:
        raise ValueError(f"ablate_direction: {reason}")
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    unit = (direction.double() / direction.double().norm()).to(device)  # (H,)
    names = {module: name for name, module in model.named_modules()}
    result = Orthogonalised(held=torch.zeros(adapter.num_layers, dtype=torch.float64))
    embed = adapter.embed()
    # Token embeddings enter the stream directly, or through OPT's project_in.
    project_in = adapter.project_in()
    if project_in is None:
        head_name = _untie_head(model, embed, names)
        if head_name is not None:
            result.changed[head_name] = adapter.lm_head().weight
            result.config_overrides["tie_word_embeddings"] = False
    # Every embedding table as wide as the stream writes into it: tokens, learned positions.
    tables = [
        m
        for m in model.modules()
        if isinstance(m, nn.Embedding) and m.embedding_dim == adapter.hidden_size
    ]
    for table in tables:
        _remove_from_rows(table.weight, unit)
        result.changed[f"{names[table]}.weight"] = table.weight
    projections = [(names[project_in], project_in.weight, None)] if project_in else []
    for layer in range(adapter.num_layers):
        for projection in (adapter.attn_out(layer), adapter.mlp_out(layer)):
            name = names[projection.module]
            projections.append((name, projection.weight, projection.bias))
    for name, weight, bias in projections:
        _remove_from_outputs(weight, unit)
        # The stored tensor, in its own layout (GPT-2 Conv1D keeps [in, out]).
        result.changed[f"{name}.weight"] = model.get_submodule(name).weight
        if bias is not None:
            _remove_from_rows(bias, unit)
            result.changed[f"{name}.bias"] = bias
    return result
