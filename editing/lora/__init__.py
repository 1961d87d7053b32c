"""LoRA through peft as the ``lora`` surgery method: fine-tuning edits (facts, examples) and
recovery after pruning (text), merged into plain weights or kept as a peft adapter.

A merged version is plain weights. An unmerged one stores the adapter as artifacts that attach
through the registry's seam (peft injects its layers, ``unload`` restores the originals); it is
a leaf, because a later weight edit would change the base the adapter was trained against.

The config is torch-free (registered on import); peft and the rest are imported on first use.
"""

from modelsurgery.editing.lazy import lazy_exports
from modelsurgery.editing.lora.config import OBJECTIVE_DEFAULTS, LoraEditConfig
from modelsurgery.editing.registry import Attachment, Implementation, register_method


def _implementation() -> Implementation:
    from modelsurgery.editing.lora.adapter import (
        ADAPTER_DIR,
        ARTIFACTS,
        LOADING_NOTE,
        attach_adapter,
    )
    from modelsurgery.editing.lora.method import run

    attachment = Attachment(
        artifacts=ARTIFACTS, attach=attach_adapter, loading=LOADING_NOTE, adapter_folder=ADAPTER_DIR
    )
    return Implementation(run, attachment)


register_method("lora", LoraEditConfig, _implementation)

__getattr__, __dir__ = lazy_exports(__name__, {".adapter": ("CONFIG_ARTIFACT", "attach_adapter")})

__all__ = ["CONFIG_ARTIFACT", "OBJECTIVE_DEFAULTS", "LoraEditConfig", "attach_adapter"]
