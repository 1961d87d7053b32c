"""Biased attention heads: per-head scores, the ``mask_biased_heads`` method (registered on
import) and a score heat map. The pairs and metrics it measures with are the shared
``editing.stereotypes`` library."""

from modelsurgery.editing.bias.method import MaskBiasedHeadsConfig
from modelsurgery.editing.bias.plot import plot_head_scores
from modelsurgery.editing.bias.scoring import HeadMask, HeadScores, score_heads, select_heads

__all__ = [
    "HeadMask",
    "HeadScores",
    "MaskBiasedHeadsConfig",
    "plot_head_scores",
    "score_heads",
    "select_heads",
]
