"""MEMIT: v* (here z, a residual-stream target at the last edited layer) for every fact, then
for each edited layer in turn a least-squares update of its down projection that moves the
facts' keys toward their share of the remaining residual, regularised by lambda * C.

For layer l (i-th of n): K = keys at l with earlier layers already updated [F, in], R = (z -
current output of the last layer) / (n - i) [F, out], and
W_l += R^T K (lambda C + K^T K)^-1   (the normal equations of MEMIT's objective),
or with ``projection: null_space`` AlphaEdit's form (``knowledge.nullspace``), which also keeps
the keys of the lineage's earlier edits (``knowledge.preserved``).

Scale: v* runs in batches of ``fact_batch`` facts of similar length (``knowledge.targets``,
spread over the context's fan-out) and keeps only each fact's delta [F, d];
the keys [F, in] and current outputs [F, d] of one layer at a time are the largest tensors
(10,000 facts on SmolLM2-135M: 61 MB and 23 MB in float32), and the solve is [in, in] (or
[r, r] in the null space) in float64 whatever F is: no per-fact loop in the update.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelsurgery.editing.knowledge.config import family_defaults
from modelsurgery.editing.knowledge.keys import keys_and_outputs
from modelsurgery.editing.knowledge.nullspace import (
    null_space,
    projected_update,
    projection_record,
)
from modelsurgery.editing.knowledge.preserved import PRESERVED_KEYS_ARTIFACT, PreservedKeys
from modelsurgery.editing.knowledge.stats import layer_statistics
from modelsurgery.editing.knowledge.targets import Targets, optimise_targets
from modelsurgery.editing.registry import MethodContext, SurgeryResult
from modelsurgery.models.adapters import get_adapter

from .config import MemitConfig


def memit_update(
    keys: torch.Tensor, residuals: torch.Tensor, mom2: torch.Tensor, weight: float
) -> torch.Tensor:
    """[out, in] update R^T K (weight * C + K^T K)^-1 in float64 (keys [F, in], residuals
    [F, out]); solved against K^T R [in, out], so its cost does not grow with F."""
    k = keys.double().to(mom2.device)
    system = weight * mom2 + k.T @ k  # [in, in], symmetric positive definite
    rhs = k.T @ residuals.double().to(mom2.device)  # [in, out]
    return torch.linalg.solve(system, rhs).T.to(keys.device)


def vstar_targets(
    model: nn.Module, tokenizer: Any, config: MemitConfig, context: MethodContext
) -> Targets:
    """Every fact's v* delta at the last edited layer's output, in the facts' order."""
    defaults = family_defaults(get_adapter(model).model_type)
    return optimise_targets(
        model,
        tokenizer,
        config.facts,
        layer=config.edit_layers(model.config)[-1],
        site="layer",
        params=config.vstar_params(defaults, defaults.memit_clamp),
        templates=config.templates(),
        batch_size=config.fact_batch,
        dtype=config.vstar_dtype,
        context=context,
    )


def run(
    model: nn.Module, tokenizer: Any, config: MemitConfig, context: MethodContext
) -> SurgeryResult:
    adapter = get_adapter(model)
    layers = config.edit_layers(model.config)
    last = layers[-1]
    defaults = family_defaults(adapter.model_type)
    facts = config.facts
    stats = layer_statistics(model, tokenizer, adapter, layers, context, config.stats_settings())
    preserved = PreservedKeys.from_bytes(context.read_artifact(PRESERVED_KEYS_ARTIFACT))
    targets = vstar_targets(model, tokenizer, config, context)
    z: torch.Tensor | None = None
    weight = config.lambda_weight(model.config)
    threshold, ridge = config.projection_settings(defaults)
    inside = weight if config.nullspace_mom2 else 0.0
    changed: dict[str, torch.Tensor] = {}
    spaces: dict[str, dict[str, int]] = {}
    for i, layer in enumerate(layers):
        context.check_cancelled()
        context.progress("memit: updating layer", step=i, total=len(layers), layer=layer)
        keys, current = keys_and_outputs(
            model,
            tokenizer,
            adapter,
            facts,
            key_layer=layer,
            out_layer=last,
            templates=config.templates(),
        )
        if z is None:
            z = current + targets.deltas  # [F, d]: the last layer's outputs before any update
        residuals = (z - current) / (len(layers) - i)
        projection = adapter.mlp_out(layer)
        module = adapter.mlp_out_path(layer)
        if config.projects(preserved.count(module)):
            space = null_space(stats[layer], threshold)
            earlier = preserved.gram(module, keys.shape[1], context.progress)
            spaces[str(layer)] = {"rank": space.rank, "preserved_keys": preserved.count(module)}
            update = projected_update(keys, residuals, space, earlier, ridge, inside)
        else:
            update = memit_update(keys, residuals, stats[layer].mom2, weight)
        with torch.no_grad():
            projection.weight.add_(update.to(projection.weight))
        preserved.add(module, keys)
        changed[f"{module}.weight"] = projection.module.weight.detach().clone()
    context.progress("memit: edited", step=len(layers), total=len(layers))
    metrics = {
        "v_loss": sum(targets.losses) / len(facts),
        "v_steps_used": sum(targets.steps) / len(facts),
    }
    resolved: dict[str, Any] = {
        "vstar_dtype": str(targets.dtype).removeprefix("torch."),
        # ``auto`` stays only where it projected some layers and not others: the one value
        # a rebuilt job on the same parent (same preserved keys) reproduces.
        "projection": "none"
        if not spaces
        else "null_space"
        if len(spaces) == len(layers)
        else config.projection,
        "statistics": {str(layer): stats[layer].record() for layer in layers},
    }
    if spaces:
        resolved["null_space"] = projection_record(threshold, ridge, inside, spaces)
    return SurgeryResult(
        changed=changed,
        metrics=metrics,
        suite=config.suite(),
        artifacts={PRESERVED_KEYS_ARTIFACT: preserved.to_bytes()},
        resolved=resolved,
    )
