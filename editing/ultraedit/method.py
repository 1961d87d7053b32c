"""UltraEdit's edit, chunk by chunk (see ``UltraEditConfig``): gradients of every edited down
projection from one forward and backward pass, the lifelong normaliser, one-step targets, and
an identity-regularised least-squares solve per module."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelsurgery.editing.knowledge.gradients import (
    RunningMoments,
    one_step_targets,
    site_gradients,
)
from modelsurgery.editing.registry import MethodContext, SurgeryResult
from modelsurgery.models.adapters import get_adapter

from .config import UltraEditConfig


def ridge_update(keys: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[out, in] update R^T K (K^T K + I)^-1 in float64 (keys [F, in], targets [F, out])."""
    k = keys.double()
    system = k.T @ k + torch.eye(k.shape[1], dtype=k.dtype, device=k.device)  # [in, in]
    return torch.linalg.solve(system, k.T @ targets.double().to(k.device)).T


def run(
    model: nn.Module, tokenizer: Any, config: UltraEditConfig, context: MethodContext
) -> SurgeryResult:
    adapter = get_adapter(model)
    layers = config.edit_layers(model.config)
    sites = [adapter.mlp_out(layer).module for layer in layers]
    normaliser: RunningMoments | None = None
    losses: list[float] = []
    facts = config.facts
    for first in range(0, len(facts), config.chunk_size):
        context.check_cancelled()
        chunk = facts[first : first + config.chunk_size]
        # 1. k [C, in] and g [C, d] of every edited module, from the unedited-so-far model.
        found, nll = site_gradients(model, tokenizer, adapter, chunk, sites, first_layer=layers[0])
        losses += nll.tolist()
        # 2. The normaliser (one for these same-shaped modules) takes every module's rows.
        if normaliser is None:
            normaliser = RunningMoments(found[0].inputs.shape[1] + found[0].grads.shape[1])
        for site in found:
            normaliser.update(torch.cat([site.inputs, site.grads], dim=1))
        # 3. Per module: one-step targets [C, d], then the ridge solve, applied at once.
        for layer, site in zip(layers, found, strict=True):
            steps = one_step_targets(site.inputs, site.grads, normaliser, config.lr)
            projection = adapter.mlp_out(layer)
            with torch.no_grad():
                projection.weight.add_(ridge_update(site.inputs, steps).to(projection.weight))
        done = first + len(chunk)
        context.progress("ultraedit: facts written", step=done, total=len(facts))
    changed = {
        f"{adapter.mlp_out_path(layer)}.weight": adapter.mlp_out(layer)
        .module.weight.detach()
        .clone()
        for layer in layers
    }
    return SurgeryResult(
        changed=changed,
        metrics={"v_loss": sum(losses) / len(losses)},
        suite=config.suite(),
        resolved={"layers": layers},
    )
