"""ROME: for each fact, a rank-one update of one MLP down projection so that the (template-
averaged) key of the subject maps to v*.

Update: with k = averaged key, u = C^-1 k (C with a tiny ridge, factored once per job) and
delta = v* - W k (the optimised output change), W' = W + delta u^T / (u^T k), hence
W' k = W k + delta exactly. The denominator uses the same averaged key as the numerator (the
fix of kmeng01/rome PR #44), not the bare prompt's key.
With ``projection: null_space`` the update's direction is AlphaEdit's instead
(``knowledge.nullspace.projected_rank_one``): out of the preserved keys' span and, along the
lineage and the job's own list, away from the keys of earlier edits (``knowledge.preserved``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelsurgery.editing.knowledge.config import family_defaults
from modelsurgery.editing.knowledge.keys import keys_and_outputs
from modelsurgery.editing.knowledge.nullspace import (
    null_space,
    projected_rank_one,
    projection_record,
)
from modelsurgery.editing.knowledge.precision import optimisation_dtype
from modelsurgery.editing.knowledge.preserved import PRESERVED_KEYS_ARTIFACT, PreservedKeys
from modelsurgery.editing.knowledge.solve import SpdSolve, with_ridge
from modelsurgery.editing.knowledge.stats import layer_statistics
from modelsurgery.editing.knowledge.targets import VStarBatch, optimise_batch
from modelsurgery.editing.registry import MethodContext, SurgeryResult
from modelsurgery.models.adapters import get_adapter

from .config import RomeConfig


def rank_one_update(key: torch.Tensor, delta: torch.Tensor, mom2: SpdSolve | None) -> torch.Tensor:
    """[out, in] update mapping ``key`` to ``key``'s output + ``delta`` (float64); ``mom2``
    solves against C (plus a tiny ridge), factored once per job."""
    k = key.double()
    u = mom2(k).to(k.device) if mom2 is not None else k
    return torch.outer(delta.double(), u) / torch.dot(u, k)


def run(
    model: nn.Module, tokenizer: Any, config: RomeConfig, context: MethodContext
) -> SurgeryResult:
    adapter = get_adapter(model)
    layer = config.edit_layer(model.config)
    defaults = family_defaults(adapter.model_type)
    params = config.vstar_params(defaults, defaults.rome_clamp)
    preserved = PreservedKeys.from_bytes(context.read_artifact(PRESERVED_KEYS_ARTIFACT))
    module = adapter.mlp_out_path(layer)
    preserved_before = preserved.count(module)
    projected = config.projects(preserved_before)
    stats = None
    if config.use_mom2 or projected:
        settings = config.stats_settings()
        stats = layer_statistics(model, tokenizer, adapter, [layer], context, settings)[layer]
    threshold, ridge = config.projection_settings(defaults)
    inside = defaults.mom2_weight if config.nullspace_mom2 else 0.0
    space = null_space(stats, threshold) if stats is not None and projected else None
    solve = None
    if stats is not None and config.use_mom2 and space is None:
        solve = SpdSolve(lambda: with_ridge(stats.mom2))
    projection = adapter.mlp_out(layer)
    templates = config.templates()
    dtype = optimisation_dtype(model, config.vstar_dtype)
    losses, steps = [], []
    for index, fact in enumerate(config.facts):
        context.check_cancelled()
        context.progress("rome: editing", step=index, total=len(config.facts), subject=fact.subject)
        batch = VStarBatch((fact,), layer, "mlp_out", params, templates, dtype)
        deltas, fact_losses, fact_steps = optimise_batch(model, tokenizer, batch, context)
        keys, _ = keys_and_outputs(
            model, tokenizer, adapter, [fact], key_layer=layer, out_layer=layer, templates=templates
        )
        key, delta = keys[0], deltas[0].to(keys.device)
        if space is not None:
            earlier = preserved.gram(module, key.shape[0], context.progress)
            update = projected_rank_one(key, delta, space, earlier, ridge, inside)
        else:
            update = rank_one_update(key, delta, solve)
        preserved.add(module, key[None])
        with torch.no_grad():
            projection.weight.add_(update.to(projection.weight))
        losses += fact_losses
        steps += fact_steps
    context.progress("rome: edited", step=len(config.facts), total=len(config.facts))
    metrics = {"v_loss": sum(losses) / len(losses), "v_steps_used": sum(steps) / len(steps)}
    resolved: dict[str, Any] = {
        "layer": layer,
        "vstar_dtype": str(dtype).removeprefix("torch."),
        "projection": "null_space" if projected else "none",
    }
    if stats is not None:
        resolved["statistics"] = {str(layer): stats.record()}
    if space is not None:
        layers = {str(layer): {"rank": space.rank, "preserved_keys": preserved_before}}
        resolved["null_space"] = projection_record(threshold, ridge, inside, layers)
    return SurgeryResult(
        changed={f"{module}.weight": projection.module.weight.detach()},
        metrics=metrics,
        suite=config.suite(),
        artifacts={PRESERVED_KEYS_ARTIFACT: preserved.to_bytes()},
        resolved=resolved,
    )
