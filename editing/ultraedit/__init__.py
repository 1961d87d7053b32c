"""UltraEdit (Gu et al.) as the ``ultraedit`` surgery method (registered on import; the
torch-free config here, ``run`` imported on first use)."""

from modelsurgery.editing.registry import Implementation, register_method
from modelsurgery.editing.ultraedit.config import UltraEditConfig


def _implementation() -> Implementation:
    from modelsurgery.editing.ultraedit.method import run

    return Implementation(run)


register_method("ultraedit", UltraEditConfig, _implementation)

__all__ = ["UltraEditConfig"]
