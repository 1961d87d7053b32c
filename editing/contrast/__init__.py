"""Contrast pairs and the activations they produce: shared by the representation-engineering
methods (``steer``, ``iti``, ``ablate_direction``), which differ in where they read and what
they write."""

from modelsurgery.editing.contrast.activations import head_inputs, residual_outputs
from modelsurgery.editing.contrast.directions import contrast_direction, projections
from modelsurgery.editing.contrast.pairs import PairsSource, TextPair, load_text_pairs

__all__ = [
    "PairsSource",
    "TextPair",
    "contrast_direction",
    "head_inputs",
    "load_text_pairs",
    "projections",
    "residual_outputs",
]
