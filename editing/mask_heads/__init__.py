"""Attention-head masking as the ``mask_heads`` surgery method (registered on import): zero
chosen heads' columns of the attention output projection, so the result is plain weights.

The config and the ``"layer.head"`` helpers are torch-free; ``mask_heads_in_place`` and ``run``
(``method``) are imported on first use.
"""

from modelsurgery.editing.lazy import lazy_exports
from modelsurgery.editing.mask_heads.config import (
    MaskHeadsConfig,
    check_heads_in_range,
    config_sizes,
    format_head,
    parse_head,
)
from modelsurgery.editing.registry import Implementation, register_method


def _implementation() -> Implementation:
    from modelsurgery.editing.mask_heads.method import run

    return Implementation(run)


register_method("mask_heads", MaskHeadsConfig, _implementation)

__getattr__, __dir__ = lazy_exports(__name__, {".method": ("mask_heads_in_place",)})

__all__ = [
    "MaskHeadsConfig",
    "check_heads_in_range",
    "config_sizes",
    "format_head",
    "mask_heads_in_place",
    "parse_head",
]
