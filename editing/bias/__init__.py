"""Biased attention heads: contrast-pair bias metrics, per-head scores, the
``mask_biased_heads`` method (registered on import) and a score heat map."""

from modelsurgery.editing.bias.method import MaskBiasedHeadsConfig
from modelsurgery.editing.bias.metrics import (
    BiasObjective,
    TokenizedPair,
    bias_metrics,
    tokenize_pairs,
)
from modelsurgery.editing.bias.pairs import ContrastPair, load_crows_pairs, split_pairs
from modelsurgery.editing.bias.plot import plot_head_scores
from modelsurgery.editing.bias.scoring import HeadMask, HeadScores, score_heads, select_heads

__all__ = [
    "BiasObjective",
    "ContrastPair",
    "HeadMask",
    "HeadScores",
    "MaskBiasedHeadsConfig",
    "TokenizedPair",
    "bias_metrics",
    "load_crows_pairs",
    "plot_head_scores",
    "score_heads",
    "select_heads",
    "split_pairs",
    "tokenize_pairs",
]
