"""Concept bottleneck version files (``concepts/config.json`` + ``concepts/state.safetensors``)
and attaching them to a loaded model. Attaching changes nothing the model computes (its
``generate`` is the base's); it makes the bottleneck available to ``attached_bottleneck``,
which predict and intervene use."""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import numpy as np
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from modelsurgery.editing.concepts.bottleneck import BottleneckSpec, ConceptBottleneck

CONFIG_ARTIFACT = "concepts/config.json"
STATE_ARTIFACT = "concepts/state.safetensors"

_ATTACHED: weakref.WeakKeyDictionary[nn.Module, ConceptBottleneck] = weakref.WeakKeyDictionary()


def _pack(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.flatten().numpy()))


def _unpack(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    count = int(np.prod(shape))
    bits = np.unpackbits(packed.numpy(), count=count).astype(bool)
    return torch.from_numpy(bits).view(shape)


def to_artifacts(bottleneck: ConceptBottleneck) -> dict[str, bytes]:
    """The version's two files (JSON + safetensors, masks bit-packed, no pickle)."""
    tensors: dict[str, torch.Tensor] = {}
    for i, weight in enumerate(bottleneck.weights):
        tensors[f"weight.{i}"] = weight.detach().cpu().contiguous()
        if bottleneck.masks is not None:
            tensors[f"mask.{i}"] = _pack(bottleneck.masks[i].cpu())
    heads = {"concept_heads": bottleneck.concept_heads, "label_head": bottleneck.label_head}
    for prefix, module in heads.items():
        for name, value in module.state_dict().items():
            tensors[f"{prefix}.{name}"] = value.detach().cpu().contiguous()
    return {
        CONFIG_ARTIFACT: bottleneck.spec.model_dump_json(indent=2).encode("utf-8"),
        STATE_ARTIFACT: safetensors_save(tensors, metadata={"format": "modelsurgery-concepts-v1"}),
    }


def from_artifacts(model: nn.Module, artifacts: Mapping[str, bytes]) -> ConceptBottleneck:
    """Rebuild the bottleneck (inference mode) on ``model``."""
    missing = [k for k in (CONFIG_ARTIFACT, STATE_ARTIFACT) if k not in artifacts]
    if missing:
        raise ValueError(f"not a concept bottleneck version: artifacts lack {missing}")
    spec = BottleneckSpec.model_validate_json(artifacts[CONFIG_ARTIFACT])
    tensors = safetensors_load(artifacts[STATE_ARTIFACT])
    bottleneck = ConceptBottleneck(spec, model)
    with torch.no_grad():
        for i, weight in enumerate(bottleneck.weights):  # each beside its layer
            weight.data = tensors[f"weight.{i}"].to(weight.device)
        if bottleneck.masks is not None:
            bottleneck.masks = [
                _unpack(tensors[f"mask.{i}"], (len(spec.concepts), *w.shape))
                for i, w in enumerate(bottleneck.weights)
            ]
        for prefix in ("concept_heads", "label_head"):
            module = getattr(bottleneck, prefix)
            own = {
                k.removeprefix(f"{prefix}."): v
                for k, v in tensors.items()
                if k.startswith(f"{prefix}.")
            }
            module.load_state_dict(own)
    bottleneck.to_model_devices(model)
    bottleneck.requires_grad_(False)
    return bottleneck.eval()


class BottleneckHandle:
    """A bottleneck attached to a model; ``remove()`` detaches it."""

    def __init__(self, model: nn.Module, bottleneck: ConceptBottleneck) -> None:
        self._model = weakref.ref(model)
        _ATTACHED[model] = bottleneck

    def remove(self) -> None:
        model = self._model()
        if model is not None:
            _ATTACHED.pop(model, None)


def attach_bottleneck(model: nn.Module, artifacts: Mapping[str, bytes]) -> BottleneckHandle:
    return BottleneckHandle(model, from_artifacts(model, artifacts))


def attached_bottleneck(model: nn.Module) -> ConceptBottleneck:
    """The bottleneck attached to ``model``; a model without one is refused."""
    try:
        return _ATTACHED[model]
    except KeyError:
        raise ValueError("the model carries no concept bottleneck") from None
