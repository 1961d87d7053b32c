"""Directional ablation by weight orthogonalisation (``ablate_direction``, registered on
import): remove one contrast direction from everything that writes to the residual stream."""

from modelsurgery.editing.ablate_direction.config import AblateDirectionConfig
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
    "fit_direction",
    "orthogonalise_in_place",
    "run",
    "unsupported_reason",
]
