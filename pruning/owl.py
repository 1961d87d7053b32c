"""OWL (Yin et al., ICML 2024): sparsity per layer from the layer's outlier ratio.

Layers whose Wanda scores hold more outliers (scores above ``threshold`` times the layer's mean)
are pruned less. The outlier ratios are rescaled to [0, 2 * lambda] and centred, so every ratio
stays within +-lambda of the target and their mean is the target.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from modelsurgery.models.adapters import Projection
from modelsurgery.pruning.calibration import LayerwiseCalibration
from modelsurgery.pruning.metrics import block_projections
from modelsurgery.pruning.scores import wanda_scores


def outlier_ratio(scores: list[torch.Tensor], threshold: float) -> float:
    """Fraction of all the layer's scores above ``threshold`` times their mean."""
    flat = torch.cat([s.flatten().float() for s in scores])
    return float((flat > threshold * flat.mean()).float().mean())


def owl_ratios(outliers: dict[int, float], target: float, spread: float) -> dict[int, float]:
    """Per-layer sparsity: ``target`` minus the layer's centred, rescaled outlier ratio."""
    values = torch.tensor([outliers[layer] for layer in sorted(outliers)], dtype=torch.float64)
    span = float(values.max() - values.min())
    scaled = (values - values.min()) / span * 2 * spread if span > 0 else values * 0
    ratios = target - (scaled - scaled.mean())
    return {layer: round(float(r), 6) for layer, r in zip(sorted(outliers), ratios, strict=True)}


def measure_outliers(
    calibration: LayerwiseCalibration,
    layers: list[int],
    threshold: float,
    check_cancelled: Callable[[], None],
) -> dict[int, float]:
    """Outlier ratio of each of ``layers`` on the dense model (one calibration pass)."""
    adapter = calibration.adapter
    inputs = calibration.capture()
    outliers: dict[int, float] = {}
    for index in range(max(layers) + 1):
        check_cancelled()
        if index in layers:
            modules = block_projections(adapter, [index])
            stats = calibration.collect(index, inputs, modules)
            scores = [
                wanda_scores(Projection(module, adapter.layout.conv1d).weight, stats[name].l2())
                for name, module in modules.items()
            ]
            outliers[index] = outlier_ratio(scores, threshold)
        if index < max(layers):
            inputs = calibration.run_layer(index, inputs)
    return outliers
