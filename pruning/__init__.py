"""Pruning: structured (MLP neurons, KV head groups), unstructured and N:M (Wanda, magnitude).

The ``prune`` method registers from ``modelsurgery.pruning.prune``. ``apply_pruned_config`` /
``apply_layer_widths`` give a freshly built model the per-layer shapes of a non-uniformly pruned
checkpoint before its tensors are loaded.
"""

from modelsurgery.pruning.resize import (
    KV_HEADS_KEY,
    MLP_WIDTHS_KEY,
    apply_layer_widths,
    apply_pruned_config,
)

__all__ = ["KV_HEADS_KEY", "MLP_WIDTHS_KEY", "apply_layer_widths", "apply_pruned_config"]
