"""A model from a config plus a tensor map (stored versions; pruned folders).

Uniform shapes go through ``from_pretrained(None, config=..., state_dict=...)``: built on the
meta device, buffers and tied weights filled the way a folder load fills them, no random init to
overwrite. Non-uniformly pruned checkpoints (per-layer widths in the config, see
``modelsurgery.pruning``) are built with ``from_config``, resized, then loaded strictly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from modelsurgery.models.digest import persistent_state_dict

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def has_layer_widths(config: PretrainedConfig) -> bool:
    """Whether the config records per-layer widths that ``from_pretrained`` cannot build."""
    from modelsurgery.pruning import KV_HEADS_KEY, MLP_WIDTHS_KEY

    return any(getattr(config, key, None) for key in (MLP_WIDTHS_KEY, KV_HEADS_KEY))


def build_model(
    config: PretrainedConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, source: str
) -> PreTrainedModel:
    """The causal LM of ``config`` holding exactly ``state``; a clear error when a tensor the
    config needs is missing, unexpected or of another shape (nothing is left random)."""
    if has_layer_widths(config):
        return _build_resized(config, state, dtype, source)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:
        raise ValueError(f"{source}: no causal LM class for model_type {config.model_type!r}")
    model, info = model_class.from_pretrained(
        None, config=config, state_dict=state, dtype=dtype, output_loading_info=True
    )
    problems = {key: value for key, value in info.items() if value}
    if problems:
        raise ValueError(f"{source} does not match its config: {problems}")
    return model


def _build_resized(
    config: PretrainedConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, source: str
) -> PreTrainedModel:
    from modelsurgery.pruning import apply_pruned_config

    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    apply_pruned_config(model)
    model.tie_weights()
    expected = set(persistent_state_dict(model))
    if set(state) != expected:
        missing = sorted(expected - set(state))[:5]
        extra = sorted(set(state) - expected)[:5]
        raise ValueError(
            f"{source} does not match its config: missing {missing}, unexpected {extra}"
        )
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


def read_folder_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved model folder (single file or sharded with an index)."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map: dict[str, Any] = json.loads(index.read_text())["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(folder / shard))
        return state
    single = folder / SAFETENSORS_FILE
    if not single.is_file():
        raise ValueError(f"{folder} has no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}")
    return load_file(single)
