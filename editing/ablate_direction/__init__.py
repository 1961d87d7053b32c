"""Directional ablation by weight orthogonalisation (``ablate_direction``, registered on
import): remove one contrast direction from everything that writes to the residual stream,
then optionally hold the stream's component along it at its calibration mean. The config is
torch-free; the rest is imported on first use."""

from modelsurgery.editing.ablate_direction.config import AblateDirectionConfig
from modelsurgery.editing.lazy import lazy_exports
from modelsurgery.editing.registry import Implementation, register_method


def _implementation() -> Implementation:
    from modelsurgery.editing.ablate_direction.method import run

    return Implementation(run)


register_method("ablate_direction", AblateDirectionConfig, _implementation)

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        ".mean_fill": ("ablate_in_place", "layer_mean_projections"),
        ".method": ("fit_direction",),
        ".orthogonalize": ("orthogonalise_in_place", "unsupported_reason"),
    },
)

__all__ = [
    "AblateDirectionConfig",
    "ablate_in_place",
    "fit_direction",
    "layer_mean_projections",
    "orthogonalise_in_place",
    "unsupported_reason",
]
