"""Which modules LoRA adapts: a family's attention and MLP projections, by leaf name, in the
chosen layers, resolved to full module paths (so peft needs no layer-name pattern and pruned,
narrower projections are found the same way)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from modelsurgery.editing.knowledge.config import default_memit_layers, layer_count
from modelsurgery.models.adapters import FAMILIES, FamilyLayout, get_adapter


def projection_paths(layout: FamilyLayout) -> list[str]:
    """Every attention and MLP projection of one decoder layer, relative to it."""
    attention = [layout.attn_q, layout.attn_k, layout.attn_v, layout.fused_qkv, layout.attn_out]
    return [p for p in (*attention, *layout.mlp_in, layout.mlp_out) if p is not None]


def leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def check_targets(
    model_config: Any, target_modules: Sequence[str] | None, layers: Sequence[int] | None
) -> None:
    """Names and layer indices against the model's family and depth (raise ValueError naming
    the field); runs before a job is queued, without weights."""
    model_type = getattr(model_config, "model_type", None)
    layout = FAMILIES.get(model_type or "")
    if layout is None:
        raise ValueError(f"target_modules: LoRA does not know model type {model_type!r}")
    known = [leaf(p) for p in projection_paths(layout)]
    for i, name in enumerate(target_modules or ()):
        if name not in known:
            raise ValueError(
                f"target_modules[{i}]: {name!r} is not a projection of a {model_type} layer "
                f"(known: {', '.join(known)})"
            )
    depth = layer_count(model_config)
    for i, layer in enumerate(layers or ()):
        if layer >= depth:
            raise ValueError(f"layers[{i}]: layer {layer} out of range (model has {depth} layers)")


def default_targets(model: nn.Module) -> tuple[list[str], list[int]]:
    """Where fact edits go by default: the MLP output projection of the family's MEMIT layers."""
    adapter = get_adapter(model)
    layers = default_memit_layers(adapter.model_type, len(adapter.layers()))
    return [leaf(adapter.layout.mlp_out)], layers


def projection_leaves(model: nn.Module) -> list[str]:
    """Every projection a LoRA may adapt in this family (the default targets)."""
    return sorted({leaf(p) for p in projection_paths(get_adapter(model).layout)})


def target_paths(
    model: nn.Module, target_modules: Sequence[str] | None, layers: Sequence[int] | None
) -> list[str]:
    """Full module paths to adapt, in layer order."""
    check_targets(model.config, target_modules, layers)
    adapter = get_adapter(model)
    relative = projection_paths(adapter.layout)
    wanted = set(target_modules or projection_leaves(model))
    indices = layers if layers is not None else range(len(adapter.layers()))
    return [
        adapter.module_path(index, path)
        for index in sorted(indices)
        for path in relative
        if leaf(path) in wanted
    ]
