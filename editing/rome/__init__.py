"""ROME (rank-one model editing) as the ``rome`` surgery method (registered on import; the
torch-free config here, ``run`` and ``rank_one_update`` imported on first use)."""

from modelsurgery.editing.lazy import lazy_exports
from modelsurgery.editing.registry import Implementation, register_method
from modelsurgery.editing.rome.config import RomeConfig


def _implementation() -> Implementation:
    from modelsurgery.editing.rome.method import run

    return Implementation(run)


register_method("rome", RomeConfig, _implementation)

__getattr__, __dir__ = lazy_exports(__name__, {".method": ("rank_one_update", "run")})

__all__ = ["RomeConfig", "rank_one_update", "run"]
