"""ReFT version files (``reft/config.json`` + ``reft/interventions.safetensors``) and attaching
them to a loaded model."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from modelsurgery.editing.reft.config import InterventionSpec
from modelsurgery.editing.reft.hooks import InterventionHandle, attach
from modelsurgery.editing.reft.interventions import ReftInterventions

CONFIG_ARTIFACT = "reft/config.json"
TENSORS_ARTIFACT = "reft/interventions.safetensors"


def to_artifacts(interventions: ReftInterventions) -> dict[str, bytes]:
    """The two files a ReFT version stores (JSON + safetensors, no pickle)."""
    config = json.dumps(interventions.spec.model_dump(), indent=2, sort_keys=True)
    return {
        CONFIG_ARTIFACT: config.encode("utf-8"),
        TENSORS_ARTIFACT: safetensors_save(
            interventions.tensors(), metadata={"format": "modelsurgery-reft-v1"}
        ),
    }


def from_artifacts(artifacts: Mapping[str, bytes]) -> ReftInterventions:
    """Rebuild the (inference-only) interventions from a version's artifacts."""
    missing = [k for k in (CONFIG_ARTIFACT, TENSORS_ARTIFACT) if k not in artifacts]
    if missing:
        raise ValueError(f"not a ReFT version: artifacts lack {missing}")
    spec = InterventionSpec.model_validate_json(artifacts[CONFIG_ARTIFACT])
    return ReftInterventions.from_tensors(spec, safetensors_load(artifacts[TENSORS_ARTIFACT]))


def attach_interventions(model: nn.Module, artifacts: Mapping[str, bytes]) -> InterventionHandle:
    """Register a ReFT version's interventions on ``model``; ordinary ``model(...)`` and
    ``model.generate(...)`` then apply them (see ``hooks`` for the prompt rule)."""
    return attach(model, from_artifacts(artifacts))


def attach_from_folder(model: nn.Module, folder: str | Path) -> InterventionHandle:
    """Attach the interventions an exported ReFT version keeps beside its weights."""
    root = Path(folder)
    files = {name: root / name for name in (CONFIG_ARTIFACT, TENSORS_ARTIFACT)}
    absent = [name for name, path in files.items() if not path.is_file()]
    if absent:
        raise FileNotFoundError(f"{root} has no ReFT interventions: missing {absent}")
    return attach_interventions(model, {name: path.read_bytes() for name, path in files.items()})
