"""ROME: for each fact, a rank-one update of one MLP down projection so that the (template-
averaged) key of the subject maps to v*.

Update: with k = averaged key, u = C^-1 k and delta = v* - W k (the optimised output change),
W' = W + delta u^T / (u^T k), hence W' k = W k + delta exactly. The denominator uses the same
averaged key as the numerator (the fix of kmeng01/rome PR #44), not the bare prompt's key.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelsurgery.editing.knowledge.config import family_defaults
from modelsurgery.editing.knowledge.evaluate import EditEvaluation
from modelsurgery.editing.knowledge.stats import second_moments
from modelsurgery.editing.knowledge.vstar import optimize_deltas
from modelsurgery.editing.registry import MethodContext, SurgeryResult
from modelsurgery.models.adapters import get_adapter

from .config import RomeConfig


def rank_one_update(
    key: torch.Tensor, delta: torch.Tensor, mom2: torch.Tensor | None
) -> torch.Tensor:
    """[out, in] update mapping ``key`` to ``key``'s output + ``delta`` (float64)."""
    k = key.double()
    u = _solve(mom2, k) if mom2 is not None else k
    return torch.outer(delta.double(), u) / torch.dot(u, k)


def _solve(mom2: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """C^-1 k, with a tiny ridge so an ill-conditioned C (few calibration tokens) stays finite."""
    ridge = 1e-6 * mom2.diagonal().mean()
    eye = torch.eye(mom2.shape[0], dtype=mom2.dtype, device=mom2.device)
    return torch.linalg.solve(mom2 + ridge * eye, k.to(mom2.device)).to(k.device)


def run(
    model: nn.Module, tokenizer: Any, config: RomeConfig, context: MethodContext
) -> SurgeryResult:
    adapter = get_adapter(model)
    layer = config.edit_layer(model.config)
    config.check_against(model.config)
    defaults = family_defaults(adapter.model_type)
    params = config.vstar_params(defaults, defaults.rome_clamp)
    evaluation = EditEvaluation(
        model,
        tokenizer,
        adapter,
        config.facts,
        facts_metrics=config.evaluate,
        perplexity_tokens=config.perplexity_tokens if config.evaluate_perplexity else None,
    )
    evaluation.start()
    mom2 = None
    if config.use_mom2:
        mom2 = second_moments(model, tokenizer, adapter, [layer], context, config.stats_settings())[
            layer
        ]
    projection = adapter.mlp_out(layer)
    losses, steps = [], []
    for index, fact in enumerate(config.facts):
        context.check_cancelled()
        context.progress("rome: editing", step=index, total=len(config.facts), subject=fact.subject)
        result = optimize_deltas(
            model,
            tokenizer,
            adapter,
            [fact],
            layer=layer,
            site="mlp_out",
            params=params,
            templates=config.templates(),
            context=context,
            capture_keys=True,
        )
        assert result.keys is not None
        update = rank_one_update(result.keys[0], result.deltas[0], mom2)
        with torch.no_grad():
            projection.weight.add_(update.to(projection.weight))
        losses += result.losses
        steps += result.steps
    context.progress("rome: edited", step=len(config.facts), total=len(config.facts))
    metrics = evaluation.finish()
    metrics["v_loss"] = sum(losses) / len(losses)
    metrics["v_steps_used"] = sum(steps) / len(steps)
    name = f"{adapter.mlp_out_path(layer)}.weight"
    return SurgeryResult(
        changed={name: projection.module.weight.detach().clone()},
        metrics=metrics,
        suite=config.suite(),
    )
