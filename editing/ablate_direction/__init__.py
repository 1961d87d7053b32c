"""Directional ablation by weight orthogonalisation (``ablate_direction``, registered on
import): remove one contrast direction from everything that writes to the residual stream,
then optionally hold the stream's component along it at its calibration mean."""

from modelsurgery.editing.ablate_direction.config import AblateDirectionConfig
from modelsurgery.editing.ablate_direction.mean_fill import ablate_in_place, layer_mean_projections
from modelsurgery.editing.ablate_direction.method import fit_direction, run
from modelsurgery.editing.ablate_direction.orthogonalize import (
    Orthogonalised,
    orthogonalise_in_place,
    unsupported_reason,
)
from modelsurgery.editing.registry import register_method

register_method("ablate_direction", AblateDirectionConfig, run)

__all__ = [
    "AblateDirectionConfig",
    "Orthogonalised",
    "ablate_in_place",
    "fit_direction",
    "layer_mean_projections",
    "orthogonalise_in_place",
    "run",
    "unsupported_reason",
]
