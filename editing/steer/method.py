"""``run`` of the ``steer`` method: fit vectors on contrast pairs, then bake them into biases
or return them as hook artifacts."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelsurgery.editing.contrast import load_text_pairs
from modelsurgery.editing.contrast.pairs import split_held_out
from modelsurgery.editing.registry import MethodContext, SurgeryResult
from modelsurgery.editing.steer.artifacts import to_artifacts
from modelsurgery.editing.steer.bake import bake
from modelsurgery.editing.steer.config import SteerConfig
from modelsurgery.editing.steer.hooks import attach
from modelsurgery.editing.steer.vectors import (
    fit_vectors,
    fitted_direction,
    mean_projection,
    read_sides,
    separation,
)


def run(
    model: nn.Module, tokenizer: Any, config: SteerConfig, context: MethodContext
) -> SurgeryResult:
    pairs = load_text_pairs(config, context.data_roots)
    fit, held_out = split_held_out(pairs, config.holdout_fraction, config.seed)
    probe = held_out or fit
    layers = config.layer_indices(model.config)
    metrics: dict[str, float] = {"pairs_fitted": float(len(fit))}
    context.check_cancelled()
    context.progress("steering vectors from contrast pairs", pairs=len(fit))
    # Residual-stream activations of both sides at each steered layer: (N, L, H) each.
    fit_sides = read_sides(model, tokenizer, fit, layers, config.token)
    steering = fit_vectors(fit_sides, layers, config)
    direction = fitted_direction(steering, config.coefficient)
    before = read_sides(model, tokenizer, held_out, layers, config.token) if held_out else fit_sides
    metrics["projection_before"] = mean_projection(before, direction)
    metrics["heldout_separation"] = separation(before, direction)
    metrics["vector_norm"] = float(steering.vectors.norm(dim=-1).mean())
    context.check_cancelled()

    baked = config.bakes(model.config)
    changed: dict[str, torch.Tensor] = {}
    overrides: dict[str, Any] = {}
    artifacts: dict[str, bytes] = {}
    if baked:
        changed, overrides = bake(model, steering)
        handle = None
    else:
        artifacts = to_artifacts(steering)
        handle = attach(model, steering)
    try:
        after = read_sides(model, tokenizer, probe, layers, config.token)
        metrics["projection_after"] = mean_projection(after, direction)
    finally:
        if handle is not None:
            handle.remove()
    metrics["baked"] = float(baked)
    return SurgeryResult(
        changed=changed,
        config_overrides=overrides,
        metrics=metrics,
        artifacts=artifacts,
        resolved={"layers": steering.layers, "bake": baked},
    )
