"""Steering vectors from contrast pairs, and what they do to held-out pairs' activations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelsurgery.editing.contrast import (
    TextPair,
    contrast_direction,
    projections,
    residual_outputs,
)
from modelsurgery.editing.steer.config import SteerConfig


@dataclass
class SteeringVectors:
    """``vectors[i]`` is added to the output of decoder layer ``layers[i]``."""

    layers: list[int]
    vectors: torch.Tensor  # (L, H)
    positions: str = "all"

    def at(self, layer: int) -> torch.Tensor:
        return self.vectors[self.layers.index(layer)]


def read_sides(
    model: nn.Module, tokenizer: Any, pairs: Sequence[TextPair], layers: list[int], token: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations of the pairs' positive and negative texts: two (N, L, H) tensors."""
    positive = residual_outputs(model, tokenizer, [p.positive for p in pairs], layers, token=token)
    negative = residual_outputs(model, tokenizer, [p.negative for p in pairs], layers, token=token)
    return positive, negative


def fit_vectors(
    sides: tuple[torch.Tensor, torch.Tensor], layers: list[int], config: SteerConfig
) -> SteeringVectors:
    """sides: the fit pairs' positive and negative activations at ``layers`` (``read_sides``)."""
    # 1. One direction per layer from the paired differences: (N, L, H) -> (L, H).
    direction = contrast_direction(*sides, config.aggregate)
    # 2. The added vector is the scaled direction.
    return SteeringVectors(layers, config.coefficient * direction, config.positions)


def fitted_direction(steering: SteeringVectors, coefficient: float) -> torch.Tensor:
    """The vectors pointed the way the pairs were fitted (positive - negative): (L, H)."""
    return steering.vectors if coefficient >= 0 else -steering.vectors


def mean_projection(sides: tuple[torch.Tensor, torch.Tensor], direction: torch.Tensor) -> float:
    """Mean projection of both sides' activations (N, L, H) on each layer's unit direction."""
    return float(projections(torch.cat(sides), direction).mean())


def separation(sides: tuple[torch.Tensor, torch.Tensor], direction: torch.Tensor) -> float:
    """Mean projection of the positive minus the negative side on the unit directions: > 0
    when the direction tells held-out pairs apart the way it was fitted."""
    gap = projections(sides[0], direction) - projections(sides[1], direction)  # (N, L)
    return float(gap.mean())
