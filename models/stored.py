"""Build a model and tokenizer from a stored version (the checkpoint store's read side).

The model is built from the stored config (overrides applied, so pruned shapes come out right),
never with remote code, and filled from the resolved tensor map (``models.build``); the
tokenizer is read back from the stored files through a temporary folder.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import (
    CONFIG_MAPPING,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from modelsurgery.models.build import build_model

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


class StoreReader(Protocol):
    """The part of ``modelsurgery.checkpoints.CheckpointStore`` the loader reads."""

    def resolve(self, ref: str) -> str: ...
    def lineage(self, ref: str) -> list[Any]: ...
    def state_dict(self, ref: str) -> dict[str, torch.Tensor]: ...
    def hf_config(self, ref: str) -> dict[str, Any]: ...
    def digest(self, ref: str) -> str: ...
    def read_file(self, ref: str, name: str) -> bytes: ...


def config_from_dict(values: dict[str, Any]) -> PretrainedConfig:
    """A config object of the right class from a config.json dict (no remote code)."""
    values = {k: v for k, v in values.items() if k != "quantization_config"}
    model_type = values.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"stored config has unknown model_type {model_type!r}")
    return CONFIG_MAPPING[model_type].from_dict(values)


def stored_artifact_names(store: StoreReader, version_id: str) -> list[str]:
    """Names of every artifact a version carries (ReFT interventions, tables), own and
    inherited."""
    return sorted(set().union(*(m.artifacts for m in store.lineage(version_id))))


def load_stored_config(store: StoreReader, version_id: str) -> PretrainedConfig:
    return config_from_dict(store.hf_config(version_id))


def load_stored_model(
    store: StoreReader, version_id: str, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """The version's model; ``dtype`` None keeps the stored tensors' dtype."""
    state = store.state_dict(version_id)
    if dtype is None:
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    config = load_stored_config(store, version_id)
    model = build_model(config, state, dtype, f"stored version {version_id}")
    generation = _read_optional(store, version_id, GENERATION_CONFIG_FILE)
    if generation is not None:
        model.generation_config = GenerationConfig.from_dict(json.loads(generation))
    return model


def stored_file_names(store: StoreReader, version_id: str) -> list[str]:
    """Names of the files a version resolves (its own and its ancestors')."""
    names: set[str] = set()
    for manifest in store.lineage(version_id):
        names.update(manifest.files)
    return sorted(names)


def load_stored_tokenizer(store: StoreReader, version_id: str) -> PreTrainedTokenizerBase:
    names = [n for n in stored_file_names(store, version_id) if n != CONFIG_FILE]
    with tempfile.TemporaryDirectory(prefix="modelsurgery-tokenizer-") as tmp:
        folder = Path(tmp)
        (folder / CONFIG_FILE).write_text(json.dumps(store.hf_config(version_id)))
        for name in names:
            target = folder / name
            if not target.resolve().is_relative_to(folder.resolve()):
                raise ValueError(f"stored file name {name!r} escapes the tokenizer folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(store.read_file(version_id, name))
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def _read_optional(store: StoreReader, version_id: str, name: str) -> bytes | None:
    if name not in stored_file_names(store, version_id):
        return None
    return store.read_file(version_id, name)
