"""Baking steering vectors into weights: a constant added to decoder layer L's output is a
bias on L's MLP output projection (the last write into the residual stream in that layer),
so the steered model is a plain checkpoint that ``from_pretrained``, vLLM and llama.cpp load."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelsurgery.editing.steer.vectors import SteeringVectors
from modelsurgery.models.adapters import get_adapter
from modelsurgery.models.output_bias import enable_output_bias


@torch.no_grad()
def bake(
    model: nn.Module, steering: SteeringVectors
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Add each vector to its layer's MLP output bias in place. Returns the changed tensors
    (the biases the family's flag adds, zero, and the steered ones) and config overrides."""
    added, overrides = enable_output_bias(model, "mlp_out")
    adapter = get_adapter(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    changed = {name: params[name] for name in added}
    for layer in steering.layers:
        bias = adapter.mlp_out(layer).bias
        assert bias is not None
        bias += steering.at(layer).to(device=bias.device, dtype=bias.dtype)
        changed[f"{adapter.mlp_out_path(layer)}.bias"] = bias
    return changed, overrides
