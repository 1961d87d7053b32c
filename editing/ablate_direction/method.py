"""The ``ablate_direction`` method: read a contrast direction at one layer, orthogonalise the
residual-stream writers against it, and measure what it removed on pairs it was not fitted on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from modelsurgery.editing.ablate_direction.config import AblateDirectionConfig
from modelsurgery.editing.ablate_direction.mean_fill import ablate_in_place
from modelsurgery.editing.ablate_direction.pairs import load_contrast
from modelsurgery.editing.contrast import (
    TextPair,
    contrast_direction,
    projections,
    residual_outputs,
)
from modelsurgery.editing.contrast.activations import TokenChoice
from modelsurgery.editing.contrast.directions import Aggregate
from modelsurgery.editing.data import calibration_windows
from modelsurgery.editing.registry import MethodContext, SurgeryResult
from modelsurgery.editing.stereotypes.metrics import bias_metrics, tokenize_pairs
from modelsurgery.evaluation.metrics import PAIRS
from modelsurgery.models.adapters import get_adapter


def fit_direction(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Sequence[TextPair],
    layer: int,
    *,
    token: TokenChoice = "mean",
    aggregate: Aggregate = "mean",
    batch_size: int = 16,
) -> torch.Tensor:
    """The contrast direction (hidden,) of the pairs at ``layer``'s output, unnormalised."""
    positive = residual_outputs(
        model, tokenizer, [p.positive for p in pairs], [layer], token=token, batch_size=batch_size
    )  # (N, 1, H)
    negative = residual_outputs(
        model, tokenizer, [p.negative for p in pairs], [layer], token=token, batch_size=batch_size
    )
    return contrast_direction(positive, negative, aggregate)[0]


def _projections(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Sequence[TextPair],
    unit: torch.Tensor,
    config: AblateDirectionConfig,
) -> torch.Tensor:
    """Projection on d of the pairs' texts (positives, then negatives) at every layer: (2N, L)."""
    texts = [p.positive for p in pairs] + [p.negative for p in pairs]
    layers = range(get_adapter(model).num_layers)
    acts = residual_outputs(
        model, tokenizer, texts, layers, token=config.token, batch_size=config.batch_size
    )  # (2N, L, H)
    return projections(acts, unit)


def run(
    model: torch.nn.Module,
    tokenizer: Any,
    config: AblateDirectionConfig,
    context: MethodContext,
) -> SurgeryResult:
    num_layers = get_adapter(model).num_layers
    layer = config.resolved_layer(num_layers)
    if layer >= num_layers:
        raise ValueError(f"layer: {layer} is out of range, the model has {num_layers} layers")
    data = load_contrast(config, context.data_roots)
    if not data.heldout:
        raise ValueError("holdout_fraction: no contrast pair is held out; give more pairs")
    metrics: dict[str, float] = {
        "pairs_fit": float(len(data.fit)),
        "pairs_heldout": float(len(data.heldout)),
    }

    context.progress("reading the direction", layer=layer, pairs=len(data.fit))
    raw = fit_direction(
        model,
        tokenizer,
        data.fit,
        layer,
        token=config.token,
        aggregate=config.aggregate,
        batch_size=config.batch_size,
    )
    metrics["direction_norm"] = float(raw.norm())
    if metrics["direction_norm"] == 0.0:
        raise ValueError("pairs: the positive and negative texts give the same activations")
    unit = raw / raw.norm()  # (H,)

    n = len(data.heldout)
    bias_ids = tokenize_pairs(tokenizer, data.bias_heldout) if data.bias_heldout else None

    def measure(when: str, held: torch.Tensor | None = None) -> None:
        """``held`` (L,): the d-component each layer's output is held at after ablation."""
        context.check_cancelled()
        context.progress(f"held-out figures {when}")
        proj = _projections(model, tokenizer, data.heldout, unit, config)  # (2N, L)
        metrics[f"separation_{when}"] = float((proj[:n, layer] - proj[n:, layer]).mean())
        if when == "before":
            metrics["projection_before"] = float(proj[:, layer].abs().mean())
        elif held is not None:
            distance = (proj.double() - held).abs().mean(dim=0)  # (L,)
            metrics["projection_after"] = float(distance.max())
        if bias_ids is not None:
            bias = bias_metrics(model, bias_ids, config.batch_size)
            metrics[f"stereotype_share_{when}"] = bias["stereotype_share"]
            metrics[f"bias_gap_{when}"] = bias["bias_gap"]

    measure("before")
    calibration = None
    if config.fill == "mean":
        calibration = calibration_windows(
            tokenizer, config.calibration_windows, config.calibration_window, seed=config.seed
        )
    context.progress("orthogonalising the residual-stream writers", fill=config.fill)
    edit = ablate_in_place(model, unit, fill=config.fill, calibration=calibration)
    metrics["fill_at_layer"] = float(edit.held[layer])
    measure("after", edit.held)
    suite = {}
    if data.bias_heldout is not None:
        metrics["bias_pairs_heldout"] = float(len(data.bias_heldout))
        suite[PAIRS] = [{"stereo": p.stereo, "anti": p.anti} for p in data.bias_heldout]
    return SurgeryResult(
        changed={name: t.detach() for name, t in edit.changed.items()},
        config_overrides=edit.config_overrides,
        metrics=metrics,
        suite=suite,
        resolved={"layer": layer},
    )
