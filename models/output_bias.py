"""Biases on the projections that write into the residual stream, so a constant shift of a
layer's output (a steering vector, an ITI head shift) becomes a plain weight.

Some families always have them (GPT-2, Phi); some have them behind a config flag (Llama's
``mlp_bias`` / ``attention_bias``, OPT's ``enable_bias``), which also gives sibling projections
a bias (Llama's ``mlp_bias`` adds gate/up biases too); some never (Mistral, Qwen2's o_proj).
Which tensors a flag adds is read off the family's own model class built on the meta device,
not a table, so ``from_pretrained`` of the exported config expects exactly what we write.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from modelsurgery.models.adapters import FAMILIES

Site = Literal["mlp_out", "attn_out"]
_SITE_FLAGS: dict[str, tuple[str, ...]] = {
    "mlp_out": ("mlp_bias", "enable_bias"),
    "attn_out": ("attention_bias", "enable_bias"),
}


@lru_cache(maxsize=32)
def _meta_parameter_names(config_json: str) -> frozenset[str]:
    config = AutoConfig.for_model(**json.loads(config_json))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return frozenset(name for name, _ in model.named_parameters(remove_duplicate=False))


def _names(config: PretrainedConfig) -> frozenset[str]:
    values = config.to_dict()
    for key in ("mlp_layer_widths", "kv_heads_per_layer"):
        values.pop(key, None)  # per-layer widths change shapes, not which tensors exist
    return _meta_parameter_names(json.dumps(values, sort_keys=True, default=str))


def _site_bias_name(config: PretrainedConfig, site: Site) -> str:
    layout = FAMILIES[config.model_type]
    relative = layout.mlp_out if site == "mlp_out" else layout.attn_out
    return f"{layout.layers}.0.{relative}.bias"


def _with(config: PretrainedConfig, overrides: dict[str, Any]) -> PretrainedConfig:
    trial = copy.deepcopy(config)
    for key, value in overrides.items():
        setattr(trial, key, value)
    return trial


def bias_overrides(config: PretrainedConfig, site: Site) -> dict[str, Any] | None:
    """Config overrides under which every layer's ``site`` projection has a bias: ``{}`` when
    it has one already, ``{flag: True}`` when a flag adds it, None when the family cannot."""
    if config.model_type not in FAMILIES:
        return None
    wanted = _site_bias_name(config, site)
    if wanted in _names(config):
        return {}
    for flag in _SITE_FLAGS[site]:
        if flag in config.to_dict() and wanted in _names(_with(config, {flag: True})):
            return {flag: True}
    return None


def enable_output_bias(model: nn.Module, site: Site) -> tuple[list[str], dict[str, Any]]:
    """Give ``model`` (in place) the biases its config needs for ``site``: zero tensors for
    every one the flag adds, so the model computes exactly what it did. Returns the new
    tensors' full names (they must be stored) and the config overrides to export."""
    overrides = bias_overrides(model.config, site)
    if overrides is None:
        raise ValueError(
            f"{model.config.model_type} has no bias on its {site.replace('_', ' ')} projection"
        )
    if not overrides:
        return [], {}
    present = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    added = sorted(_names(_with(model.config, overrides)) - _names(model.config) - present)
    for name in added:
        module_path, _, leaf = name.rpartition(".")
        if leaf != "bias":
            raise ValueError(f"flag {overrides} adds {name}, which is not a bias")
        module = model.get_submodule(module_path)
        weight = module.weight
        module.bias = nn.Parameter(
            torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
            requires_grad=False,
        )
    for key, value in overrides.items():
        setattr(model.config, key, value)
    return added, overrides
