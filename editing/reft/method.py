"""``run`` of the ``reft`` method: train interventions on a frozen model, return them as
artifacts (no weight changes)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelsurgery.editing.examples import load_examples, tokenize_examples
from modelsurgery.editing.reft.artifacts import to_artifacts
from modelsurgery.editing.reft.config import InterventionSpec, ReftConfig
from modelsurgery.editing.reft.hooks import attach
from modelsurgery.editing.reft.interventions import ReftInterventions
from modelsurgery.editing.reft.lora_count import lora_parameter_count
from modelsurgery.editing.reft.train import TrainSettings, mean_loss, train
from modelsurgery.editing.registry import MethodContext, SurgeryResult
from modelsurgery.models.adapters import get_adapter


def intervention_spec(model: nn.Module, config: ReftConfig) -> InterventionSpec:
    if config.dtype == "auto":
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    else:
        dtype = config.dtype
    return InterventionSpec(
        intervention=config.intervention,
        layers=list(config.layers),
        rank=config.rank,
        positions=config.positions,
        share_weights=config.share_weights,
        hidden_size=get_adapter(model).hidden_size,
        dtype=dtype,
        model_type=model.config.model_type,
    )


def new_interventions(spec: InterventionSpec, config: ReftConfig) -> ReftInterventions:
    """Freshly initialised, trainable interventions; the init is seeded by ``config.seed``
    without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return ReftInterventions(spec, trainable=True, dropout=config.dropout)


def run(
    model: nn.Module, tokenizer: Any, config: ReftConfig, context: MethodContext
) -> SurgeryResult:
    examples = load_examples(config.examples, config.examples_file, context.data_roots)
    items = tokenize_examples(
        tokenizer, examples, max_length=config.max_length, append_eos=config.append_eos
    )
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    settings = TrainSettings(
        epochs=config.epochs,
        lr=config.lr,
        batch_size=config.batch_size,
        weight_decay=config.weight_decay,
        seed=config.seed,
        pad_id=pad_id,
    )
    spec = intervention_spec(model, config)
    interventions = new_interventions(spec, config)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    handle = attach(model, interventions)
    try:
        initial = mean_loss(model, handle, items, settings)
        stats = train(model, handle, items, settings, context)
        final = mean_loss(model, handle, items, settings)
    finally:
        handle.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
    trainable = interventions.trainable_parameter_count()
    lora = lora_parameter_count(model.config, config.layers, config.rank)
    return SurgeryResult(
        changed={},
        metrics={
            "initial_loss": initial,
            "final_loss": final,
            "trainable_parameters": float(trainable),
            "lora_parameters_same_rank": float(lora),
            "parameter_ratio_vs_lora": trainable / lora,
            "train_seconds": stats.seconds,
            "train_steps": float(stats.steps),
        },
        artifacts=to_artifacts(interventions),
        resolved={"dtype": spec.dtype},
    )
