"""MEMIT (mass-editing memory) as the ``memit`` surgery method (registered on import; the
torch-free config here, ``run`` and ``memit_update`` imported on first use)."""

from modelsurgery.editing.lazy import lazy_exports
from modelsurgery.editing.memit.config import MemitConfig
from modelsurgery.editing.registry import Implementation, register_method


def _implementation() -> Implementation:
    from modelsurgery.editing.memit.method import run

    return Implementation(run)


register_method("memit", MemitConfig, _implementation)

__getattr__, __dir__ = lazy_exports(__name__, {".method": ("memit_update", "run", "vstar_targets")})

__all__ = ["MemitConfig", "memit_update", "run", "vstar_targets"]
