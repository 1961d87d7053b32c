"""Biased attention heads as the ``mask_biased_heads`` method (registered on import): per-head
scores (``editing.bias.scoring``), masking the top heads, and a score heat map
(``editing.bias.plot``). The pairs and metrics it measures with are the shared
``editing.stereotypes`` library. The config is torch-free; the rest is imported on first use."""

from modelsurgery.editing.bias.config import MaskBiasedHeadsConfig
from modelsurgery.editing.registry import Implementation, register_method


def _implementation() -> Implementation:
    from modelsurgery.editing.bias.method import run

    return Implementation(run)


register_method("mask_biased_heads", MaskBiasedHeadsConfig, _implementation)

__all__ = ["MaskBiasedHeadsConfig"]
