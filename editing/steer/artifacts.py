"""Hook-mode steering files (``steer/config.json`` + ``steer/vectors.safetensors``)."""

from __future__ import annotations

import json
from collections.abc import Mapping

from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from modelsurgery.editing.steer.hooks import SteeringHandle, attach
from modelsurgery.editing.steer.vectors import SteeringVectors

CONFIG_ARTIFACT = "steer/config.json"
VECTORS_ARTIFACT = "steer/vectors.safetensors"


def to_artifacts(steering: SteeringVectors) -> dict[str, bytes]:
    config = {"layers": steering.layers, "positions": steering.positions}
    return {
        CONFIG_ARTIFACT: json.dumps(config, indent=2, sort_keys=True).encode("utf-8"),
        VECTORS_ARTIFACT: safetensors_save(
            {"vectors": steering.vectors.contiguous()}, metadata={"format": "modelsurgery-steer-v1"}
        ),
    }


def from_artifacts(artifacts: Mapping[str, bytes]) -> SteeringVectors:
    config = json.loads(artifacts[CONFIG_ARTIFACT])
    vectors = safetensors_load(artifacts[VECTORS_ARTIFACT])["vectors"]
    if vectors.dim() != 2 or vectors.shape[0] != len(config["layers"]):
        raise ValueError(
            f"steering vectors of shape {tuple(vectors.shape)} do not match layers "
            f"{config['layers']}"
        )
    return SteeringVectors(list(config["layers"]), vectors, config.get("positions", "all"))


def attach_steering(model: nn.Module, artifacts: Mapping[str, bytes]) -> SteeringHandle:
    """Register a hook-mode steer version's vectors on ``model``."""
    return attach(model, from_artifacts(artifacts))
