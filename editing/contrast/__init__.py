"""Contrast pairs and the activations they produce: shared by the representation-engineering
methods (``steer``, ``iti``, ``ablate_direction``), which differ in where they read and what
they write. The pairs are torch-free (method configs take them); the activation and direction
helpers are imported on first use."""

from modelsurgery.editing.contrast.pairs import PairsSource, TextPair, load_text_pairs
from modelsurgery.editing.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        ".activations": ("head_inputs", "residual_outputs"),
        ".directions": ("contrast_direction", "projections"),
    },
)

__all__ = [
    "PairsSource",
    "TextPair",
    "contrast_direction",
    "head_inputs",
    "load_text_pairs",
    "projections",
    "residual_outputs",
]
