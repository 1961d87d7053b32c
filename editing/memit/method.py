"""MEMIT: a target output change for every fact at the last edited layer, then for each edited
layer in turn a least-squares update of its down projection that moves the facts' keys toward
their share of the remaining residual, regularised by lambda * C and by the keys that must keep
their outputs.

For layer l (i-th of n): K = keys at l with earlier layers already updated [F, in], R = (z -
current output of the last layer) / (n - i) [F, out], and
W_l += R^T K (lambda C + K_p^T K_p + K^T K)^-1   (the normal equations of MEMIT's objective),
K_p the keys of the facts this job wrote in earlier chunks; or with ``projection: null_space``
AlphaEdit's form (``knowledge.nullspace``), which also keeps the keys of the lineage's earlier
edits (``knowledge.preserved``).

Targets (``targets``): ``optimised`` is Meng et al.'s v* (25 Adam steps per fact, batched by
``knowledge.targets``); ``fast`` is one forward and backward pass per fact, UltraEdit's
normalised one-step change anchored to the output's norm (``knowledge.gradients``). Facts are
written in chunks (``knowledge.chunks``): each chunk's solve keeps the earlier chunks' keys, a
forward-only check follows, and the facts that did not take get a second pass on the edited
model. Only [F, in] keys and [F, d] outputs of one chunk and one layer are held at once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelsurgery.editing.knowledge.chunks import ChunkPlan, write_in_chunks
from modelsurgery.editing.knowledge.config import family_defaults
from modelsurgery.editing.knowledge.nullspace import (
    null_space,
    projected_update,
    projection_record,
)
from modelsurgery.editing.knowledge.preserved import PRESERVED_KEYS_ARTIFACT, PreservedKeys
from modelsurgery.editing.knowledge.solve import SpdSolve
from modelsurgery.editing.knowledge.stats import layer_statistics
from modelsurgery.editing.knowledge.targets import Targets, optimise_targets
from modelsurgery.editing.registry import MethodContext, SurgeryResult
from modelsurgery.models.adapters import get_adapter

from .config import MemitConfig


def memit_update(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    mom2: torch.Tensor,
    weight: float,
    kept: torch.Tensor | None = None,
) -> torch.Tensor:
    """[out, in] update R^T K (weight * C + K_p^T K_p + K^T K)^-1 in float64 (keys [F, in],
    residuals [F, out], ``kept`` = K_p^T K_p [in, in] of keys whose outputs must not move);
    solved against K^T R [in, out], so its cost does not grow with F; one [in, in] matrix held
    (``knowledge.solve``)."""
    k = keys.double().to(mom2.device)

    def system() -> torch.Tensor:  # [in, in], symmetric positive definite, built in place
        built = k.T @ k
        built.add_(mom2, alpha=weight)
        if kept is not None:
            built.add_(kept.to(built))
        return built

    rhs = k.T @ residuals.double().to(mom2.device)  # [in, out]
    return SpdSolve(system)(rhs).T.to(keys.device)


def vstar_targets(
    model: nn.Module, tokenizer: Any, config: MemitConfig, context: MethodContext
) -> Targets:
    """Every fact's v* delta at the last edited layer's output, in the facts' order."""
    return _vstar(model, tokenizer, config, context, config.facts)


def _vstar(model, tokenizer, config: MemitConfig, context: MethodContext, facts) -> Targets:
    defaults = family_defaults(get_adapter(model).model_type)
    return optimise_targets(
        model,
        tokenizer,
        facts,
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
    config = config.resolved(model.config)
    layers = config.edit_layers(model.config)
    defaults = family_defaults(adapter.model_type)
    stats = layer_statistics(model, tokenizer, adapter, layers, context, config.stats_settings())
    preserved = PreservedKeys.from_bytes(context.read_artifact(PRESERVED_KEYS_ARTIFACT))
    weight = config.lambda_weight(model.config)
    threshold, ridge = config.projection_settings(defaults)
    inside = weight if config.nullspace_mom2 else 0.0
    spaces: dict[str, dict[str, int]] = {}
    # Projection is decided by the lineage's keys at the start of the job; the keys this job
    # writes chunk by chunk are kept by every later chunk's solve either way.
    projected = {
        layer for layer in layers if config.projects(preserved.count(adapter.mlp_out_path(layer)))
    }
    for layer in sorted(projected):
        module = adapter.mlp_out_path(layer)
        spaces[str(layer)] = {"rank": 0, "preserved_keys": preserved.count(module)}
    bases = {layer: null_space(stats[layer], threshold) for layer in projected}
    lineage = {
        layer: preserved.gram(
            adapter.mlp_out_path(layer), adapter.mlp_out(layer).weight.shape[1], context.progress
        )
        for layer in projected
    }
    for layer, space in bases.items():
        spaces[str(layer)]["rank"] = space.rank

    def solve(
        layer: int, keys: torch.Tensor, residuals: torch.Tensor, kept: torch.Tensor | None
    ) -> torch.Tensor:
        if layer not in projected:
            return memit_update(keys, residuals, stats[layer].mom2, weight, kept)
        earlier = lineage[layer]
        if kept is not None:
            earlier = kept.double() if earlier is None else earlier + kept.double()
        return projected_update(keys, residuals, bases[layer], earlier, ridge, inside)

    plan = ChunkPlan(
        layers=layers,
        chunk=config.chunk_facts(),
        targets=config.target_kind(),
        anchor=config.anchor(),
        second_pass=config.second_pass,
        templates=config.templates(),
    )
    written = write_in_chunks(
        model,
        tokenizer,
        adapter,
        config.facts,
        plan,
        solve,
        lambda facts: _vstar(model, tokenizer, config, context, facts),
        lambda layer, keys: preserved.add(adapter.mlp_out_path(layer), keys),
        context,
    )
    changed = {
        f"{adapter.mlp_out_path(layer)}.weight": adapter.mlp_out(layer).module.weight.detach()
        for layer in layers
    }
    context.progress("memit: edited", step=len(config.facts), total=len(config.facts))
    resolved: dict[str, Any] = {
        "layers": layers,
        "targets": config.target_kind(),
        "chunk_size": config.chunk_facts(),
        "target_anchor": config.anchor(),
        # ``auto`` stays only where it projected some layers and not others: the one value
        # a rebuilt job on the same parent (same preserved keys) reproduces.
        "projection": "none"
        if not spaces
        else "null_space"
        if len(spaces) == len(layers)
        else config.projection,
        "statistics": {str(layer): stats[layer].record() for layer in layers},
    }
    if written.vstar_dtype is not None:
        resolved["vstar_dtype"] = str(written.vstar_dtype).removeprefix("torch.")
    if spaces:
        resolved["null_space"] = projection_record(threshold, ridge, inside, spaces)
    return SurgeryResult(
        changed=changed,
        metrics=written.metrics(),
        suite=config.suite(),
        artifacts={PRESERVED_KEYS_ARTIFACT: preserved.to_bytes()},
        resolved=resolved,
    )
