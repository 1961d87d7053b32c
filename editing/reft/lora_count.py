"""What LoRA of the same rank on the same layers would train, counted by peft itself.

Targets: every attention and MLP projection of the intervened layers (Llama: q, k, v, o, gate,
up, down; GPT-2: c_attn, both c_proj, c_fc), the LoRA setting the ReFT paper compares with.
The count runs on a meta-device skeleton built from the config, so it allocates no weights.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from modelsurgery.models.adapters import get_adapter


def lora_target_modules(model: torch.nn.Module) -> list[str]:
    """Leaf names of the attention and MLP projections of one decoder layer."""
    layout = get_adapter(model).layout
    paths = [
        layout.attn_q,
        layout.attn_k,
        layout.attn_v,
        layout.fused_qkv,
        layout.attn_out,
        *layout.mlp_in,
        layout.mlp_out,
    ]
    return sorted({path.rsplit(".", 1)[-1] for path in paths if path})


def lora_parameter_count(model_config: Any, layers: Sequence[int], rank: int) -> int:
    config = copy.deepcopy(model_config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    lora = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=lora_target_modules(skeleton),
        layers_to_transform=list(layers),
        layers_pattern=get_adapter(skeleton).layout.layers.rsplit(".", 1)[-1],
    )
    peft_model = get_peft_model(skeleton, lora)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    return int(trainable)
