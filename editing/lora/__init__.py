"""LoRA through peft as the ``lora`` surgery method: fine-tuning edits (facts, examples) and
recovery after pruning (text), merged into plain weights or kept as a peft adapter.

A merged version is plain weights. An unmerged one stores the adapter as artifacts that attach
through the registry's seam (peft injects its layers, ``unload`` restores the originals); it is
a leaf, because a later weight edit would change the base the adapter was trained against.
"""

from modelsurgery.editing.lora.adapter import (
    ARTIFACTS,
    CONFIG_ARTIFACT,
    LOADING_NOTE,
    WEIGHTS_ARTIFACT,
    attach_adapter,
)
from modelsurgery.editing.lora.config import OBJECTIVE_DEFAULTS, LoraEditConfig
from modelsurgery.editing.lora.method import run
from modelsurgery.editing.registry import Attachment, register_method

register_method(
    "lora",
    LoraEditConfig,
    run,
    Attachment(artifacts=ARTIFACTS, attach=attach_adapter, loading=LOADING_NOTE),
)

__all__ = [
    "CONFIG_ARTIFACT",
    "OBJECTIVE_DEFAULTS",
    "WEIGHTS_ARTIFACT",
    "LoraEditConfig",
    "attach_adapter",
    "run",
]
