"""Stereotype contrast pairs and the bias metrics of a causal LM: a library, not a method.

CrowS-Pairs and WinoGender pairs, sentence log-likelihoods, stereotype share and gap. The
methods that change bias (``mask_biased_heads`` in ``editing.bias``, ``ablate_direction``)
and the evaluation layer that judges every job's final model all measure with it.
"""

from modelsurgery.editing.stereotypes.metrics import (
    BiasObjective,
    TokenizedPair,
    bias_metrics,
    tokenize_pairs,
)
from modelsurgery.editing.stereotypes.pairs import ContrastPair, load_crows_pairs, split_pairs

__all__ = [
    "BiasObjective",
    "ContrastPair",
    "TokenizedPair",
    "bias_metrics",
    "load_crows_pairs",
    "split_pairs",
    "tokenize_pairs",
]
