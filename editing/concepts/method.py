"""``run`` of the ``concept_bottleneck`` method: train the sparse (and optionally a dense)
joint concept bottleneck on a frozen model, return it as artifacts (no weight changes)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modelsurgery.editing.concepts.artifacts import to_artifacts
from modelsurgery.editing.concepts.bottleneck import ConceptBottleneck, new_spec
from modelsurgery.editing.concepts.config import CONCEPT_VALUES, ConceptBottleneckConfig
from modelsurgery.editing.concepts.data import ConceptData, load_concept_data
from modelsurgery.editing.concepts.metrics import prediction_metrics
from modelsurgery.editing.concepts.train import (
    Batch,
    TrainSettings,
    make_batches,
    new_bottleneck,
    predict,
    train,
)
from modelsurgery.editing.registry import MethodContext, SurgeryResult


def settings_of(config: ConceptBottleneckConfig) -> TrainSettings:
    return TrainSettings(
        epochs=config.epochs,
        lr=config.lr,
        backbone_lr=config.backbone_lr,
        concept_weight=config.lambda_,
        sparsity=config.sparsity,
        saliency=config.saliency,
        fisher_batches=config.fisher_batches,
        seed=config.seed,
    )


def evaluate(
    bottleneck: ConceptBottleneck, batches: list[Batch], data: ConceptData, concepts: list[str]
) -> dict[str, float]:
    examples = data.evaluation
    predictions = predict(bottleneck, batches, len(examples))
    return prediction_metrics(
        concepts,
        predictions.concepts,
        predictions.labels,
        torch.tensor([list(e.concepts) for e in examples], dtype=torch.long),
        torch.tensor([e.label for e in examples]),
    )


def fit(
    model: nn.Module,
    config: ConceptBottleneckConfig,
    data: ConceptData,
    train_batches: list[Batch],
    context: MethodContext,
    *,
    sparse: bool,
) -> tuple[ConceptBottleneck, float]:
    """A trained bottleneck and its training seconds."""
    assert config.layers is not None
    spec = new_spec(
        model,
        config.concepts,
        CONCEPT_VALUES,
        data.labels,
        config.layers,
        config.max_tokens,
        sparse,
        config.label_input,
    )
    bottleneck = new_bottleneck(spec, model, config.seed).to_model_devices(model)
    name = "sparse" if sparse else "dense"

    def progress(message: str, **fields: Any) -> None:
        context.progress(f"{message} ({name})", **fields)

    seconds = train(
        bottleneck, train_batches, settings_of(config), progress, context.check_cancelled
    )
    return bottleneck, seconds


def run(
    model: nn.Module, tokenizer: Any, config: ConceptBottleneckConfig, context: MethodContext
) -> SurgeryResult:
    config = config.resolved(model.config)
    assert config.layers is not None
    data = load_concept_data(config, context.data_roots)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    try:
        first = min(config.layers)
        train_batches = make_batches(
            model,
            tokenizer,
            data.train,
            first,
            config.max_tokens,
            config.batch_size,
            context.check_cancelled,
        )
        eval_batches = make_batches(
            model,
            tokenizer,
            data.evaluation,
            first,
            config.max_tokens,
            config.batch_size,
            context.check_cancelled,
        )
        bottleneck, seconds = fit(model, config, data, train_batches, context, sparse=True)
        metrics = evaluate(bottleneck, eval_batches, data, config.concepts)
        metrics["mask_density"] = bottleneck.mask_density()
        for layer, overlap in bottleneck.mask_overlap().items():
            metrics[f"mask_overlap_layer{layer}"] = overlap
        metrics["train_seconds"] = seconds
        metrics["train_examples"] = float(len(data.train))
        metrics["eval_examples"] = float(len(data.evaluation))
        if config.compare_dense:
            dense, _ = fit(model, config, data, train_batches, context, sparse=False)
            dense_metrics = evaluate(dense, eval_batches, data, config.concepts)
            metrics |= {f"dense_{name}": value for name, value in dense_metrics.items()}
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
    return SurgeryResult(
        changed={},
        metrics=metrics,
        artifacts=to_artifacts(bottleneck),
        resolved={"layers": list(config.layers)},
    )
