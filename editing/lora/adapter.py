"""An unmerged LoRA version's files (a peft adapter folder under ``lora/``) and attaching them.

The artifacts are exactly what ``PeftModel.save_pretrained`` writes. A version on its root's
weights exports as that adapter folder alone (``adapter_config.json``,
``adapter_model.safetensors``, a card with ``library_name: peft`` and ``base_model``), which
``PeftModel.from_pretrained(base, folder)`` loads; on edited weights the adapter sits in
``lora/`` beside them. The server and ``modelsurgery.models.load`` attach the artifacts the
same way and detach with peft's ``unload``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel
from torch import nn

ADAPTER_DIR = "lora"
CONFIG_ARTIFACT = f"{ADAPTER_DIR}/adapter_config.json"
WEIGHTS_ARTIFACT = f"{ADAPTER_DIR}/adapter_model.safetensors"
ARTIFACTS = (CONFIG_ARTIFACT, WEIGHTS_ARTIFACT)

LOADING_NOTE = (
    "The LoRA adapter is not merged, and the weights it was trained on are edited ones, so "
    "they are here with the adapter in `lora/` (a peft adapter folder). Load it with "
    "`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), "
    'f"{folder}/lora")` (then `merge_and_unload()` for plain weights), or with '
    "`modelsurgery.models.load(folder)`, which attaches it."
)


def adapter_artifacts(peft_model: PeftModel) -> dict[str, bytes]:
    """The adapter as peft saves it (config JSON + safetensors), by artifact name."""
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        return {name: (Path(tmp) / Path(name).name).read_bytes() for name in ARTIFACTS}


@dataclass
class AdapterHandle:
    """An adapter injected into a model's modules; ``remove()`` restores the original ones."""

    peft_model: PeftModel | None

    def remove(self) -> None:
        if self.peft_model is not None:
            self.peft_model.unload()
            self.peft_model = None

    def __enter__(self) -> AdapterHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach_adapter(model: nn.Module, artifacts: Mapping[str, bytes]) -> AdapterHandle:
    """Inject a stored adapter into ``model`` in place (``model(...)`` then applies it)."""
    missing = [name for name in ARTIFACTS if name not in artifacts]
    if missing:
        raise ValueError(f"not a LoRA adapter version: artifacts lack {missing}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ARTIFACTS:
            (Path(tmp) / Path(name).name).write_bytes(artifacts[name])
        peft_model = PeftModel.from_pretrained(model, tmp, is_trainable=False)
    peft_model.eval()
    return AdapterHandle(peft_model)
