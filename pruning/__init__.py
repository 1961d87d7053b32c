"""Pruning: structured (MLP neurons, KV head groups), unstructured and N:M (Wanda, magnitude).

Registers the ``prune`` method on import: the torch-free config (``pruning.config``) here, its
implementation (``pruning.prune``) imported on first use. ``apply_pruned_config``
(``pruning.resize``) gives a freshly built model the per-layer shapes of a non-uniformly pruned
checkpoint before its tensors are loaded.
"""

from modelsurgery.editing.lazy import lazy_exports
from modelsurgery.editing.registry import Implementation, register_method
from modelsurgery.pruning.config import PruneConfig


def _implementation() -> Implementation:
    from modelsurgery.pruning.prune import run

    return Implementation(run)


register_method("prune", PruneConfig, _implementation)

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        ".resize": ("KV_HEADS_KEY", "MLP_WIDTHS_KEY", "apply_pruned_config"),
    },
)

__all__ = [
    "KV_HEADS_KEY",
    "MLP_WIDTHS_KEY",
    "PruneConfig",
    "apply_pruned_config",
]
