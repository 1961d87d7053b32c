"""Architecture adapters: where each model family keeps its layers, MLP and attention projections.

Every surgery method goes through an adapter instead of hard-coding module names, so one method
works on Llama, GPT-2 (Conv1D, transposed weights), GPT-NeoX, GPT-J, OPT, Phi, ...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no adapter."""


@dataclass(frozen=True)
class FamilyLayout:
    """Module paths of one family; per-layer paths are relative to a decoder layer."""

    layers: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    attn_out: str
    embed: str
    final_norm: str
    lm_head: str
    attn_q: str | None = None
    attn_k: str | None = None
    attn_v: str | None = None
    fused_qkv: str | None = None
    conv1d: bool = False
    gated_mlp: bool = False
    intermediate_key: str = "intermediate_size"
    project_in: str | None = None
    project_out: str | None = None


_LLAMA = FamilyLayout(
    layers="model.layers",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    attn_q="self_attn.q_proj",
    attn_k="self_attn.k_proj",
    attn_v="self_attn.v_proj",
    attn_out="self_attn.o_proj",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    gated_mlp=True,
)

FAMILIES: dict[str, FamilyLayout] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "gpt2": FamilyLayout(
        layers="transformer.h",
        mlp_in=("mlp.c_fc",),
        mlp_out="mlp.c_proj",
        fused_qkv="attn.c_attn",
        attn_out="attn.c_proj",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        conv1d=True,
        intermediate_key="n_inner",
    ),
    "gpt_neox": FamilyLayout(
        layers="gpt_neox.layers",
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h",
        fused_qkv="attention.query_key_value",
        attn_out="attention.dense",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",
    ),
    "gptj": FamilyLayout(
        layers="transformer.h",
        mlp_in=("mlp.fc_in",),
        mlp_out="mlp.fc_out",
        attn_q="attn.q_proj",
        attn_k="attn.k_proj",
        attn_v="attn.v_proj",
        attn_out="attn.out_proj",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        intermediate_key="n_inner",
    ),
    "opt": FamilyLayout(
        layers="model.decoder.layers",
        mlp_in=("fc1",),
        mlp_out="fc2",
        attn_q="self_attn.q_proj",
        attn_k="self_attn.k_proj",
        attn_v="self_attn.v_proj",
        attn_out="self_attn.out_proj",
        embed="model.decoder.embed_tokens",
        final_norm="model.decoder.final_layer_norm",
        lm_head="lm_head",
        intermediate_key="ffn_dim",
        project_in="model.decoder.project_in",
        project_out="model.decoder.project_out",
    ),
    "phi": FamilyLayout(
        layers="model.layers",
        mlp_in=("mlp.fc1",),
        mlp_out="mlp.fc2",
        attn_q="self_attn.q_proj",
        attn_k="self_attn.k_proj",
        attn_v="self_attn.v_proj",
        attn_out="self_attn.dense",
        embed="model.embed_tokens",
        final_norm="model.final_layernorm",
        lm_head="lm_head",
    ),
}


def _config_int(config: object, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


class ArchitectureAdapter:
    """Resolves a family's layout against one loaded model and its config."""

    def __init__(self, model: nn.Module, layout: FamilyLayout, model_type: str) -> None:
        self.model = model
        self.layout = layout
        self.model_type = model_type
        config = model.config
        self.hidden_size = _config_int(config, "hidden_size", "n_embd", "d_model")
        self.num_layers = _config_int(config, "num_hidden_layers", "n_layer")
        self.num_heads = _config_int(config, "num_attention_heads", "n_head")
        if self.hidden_size is None or self.num_layers is None or self.num_heads is None:
            raise UnsupportedArchitectureError(
                f"config of {model_type!r} lacks hidden size, layer count or head count"
            )
        self.num_kv_heads = _config_int(config, "num_key_value_heads") or self.num_heads
        self.head_dim = _config_int(config, "head_dim") or self.hidden_size // self.num_heads
        self.intermediate_size = self.mlp_out(0).in_features_of()

    # --- modules ---------------------------------------------------------------------------
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layout.layers)

    def layer(self, index: int) -> nn.Module:
        layers = self.layers()
        if not 0 <= index < len(layers):
            raise IndexError(f"layer {index} out of range: model has {len(layers)} layers")
        return layers[index]

    def module_path(self, index: int, relative: str) -> str:
        """Full module name of a per-layer module, e.g. ``model.layers.5.mlp.down_proj``."""
        return f"{self.layout.layers}.{index}.{relative}"

    def mlp_in(self, index: int) -> list[nn.Module]:
        layer = self.layer(index)
        return [layer.get_submodule(p) for p in self.layout.mlp_in]

    def mlp_out(self, index: int) -> Projection:
        return Projection(self.layer(index).get_submodule(self.layout.mlp_out), self.layout.conv1d)

    def mlp_out_path(self, index: int) -> str:
        return self.module_path(index, self.layout.mlp_out)

    def attn_out(self, index: int) -> Projection:
        return Projection(self.layer(index).get_submodule(self.layout.attn_out), self.layout.conv1d)

    def attn_out_path(self, index: int) -> str:
        return self.module_path(index, self.layout.attn_out)

    def attn_qkv(self, index: int) -> dict[str, nn.Module]:
        """``{"q","k","v"}`` modules, or ``{"qkv"}`` for families with one fused projection."""
        layer = self.layer(index)
        if self.layout.fused_qkv is not None:
            return {"qkv": layer.get_submodule(self.layout.fused_qkv)}
        assert self.layout.attn_q and self.layout.attn_k and self.layout.attn_v
        return {
            "q": layer.get_submodule(self.layout.attn_q),
            "k": layer.get_submodule(self.layout.attn_k),
            "v": layer.get_submodule(self.layout.attn_v),
        }

    def embed(self) -> nn.Module:
        return self.model.get_submodule(self.layout.embed)

    def final_norm(self) -> nn.Module:
        """The norm before the LM head; ``nn.Identity`` where the model has none (post-LN OPT
        such as OPT-350m), so applying it is always right."""
        return self._optional_module(self.layout.final_norm) or nn.Identity()

    def lm_head(self) -> nn.Module:
        """The output projection to the vocabulary (tied to the embedding in many models)."""
        getter = getattr(self.model, "get_output_embeddings", None)
        head = getter() if getter is not None else None
        return head if head is not None else self.model.get_submodule(self.layout.lm_head)

    def project_in(self) -> nn.Module | None:
        """OPT's embedding-to-hidden projection when ``word_embed_proj_dim != hidden_size``."""
        return self._optional_module(self.layout.project_in)

    def project_out(self) -> nn.Module | None:
        """OPT's hidden-to-embedding projection applied before the LM head, if any."""
        return self._optional_module(self.layout.project_out)

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from last-layer residual states, as the model's own forward computes them
        (final norm, OPT's project_out, LM head, Gemma's logit soft-capping)."""
        hidden = self.final_norm()(hidden)
        project_out = self.project_out()
        if project_out is not None:
            hidden = project_out(hidden)
        logits = self.lm_head()(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _optional_module(self, path: str | None) -> nn.Module | None:
        if path is None:
            return None
        parent_path, _, name = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        module = getattr(parent, name, None)
        return module if isinstance(module, nn.Module) else None

    # --- heads -----------------------------------------------------------------------------
    def head_columns(self, head: int) -> slice:
        """Columns of the attention output projection's input that belong to one head."""
        if not 0 <= head < self.num_heads:
            raise IndexError(f"head {head} out of range: model has {self.num_heads} heads")
        return slice(head * self.head_dim, (head + 1) * self.head_dim)

    def kv_group(self, head: int) -> int:
        """The KV head a query head reads (grouped-query attention)."""
        return head // (self.num_heads // self.num_kv_heads)


class Projection:
    """A Linear or GPT-2 Conv1D seen as ``y = W x + b`` with ``W`` of shape [out, in]."""

    def __init__(self, module: nn.Module, conv1d: bool) -> None:
        self.module = module
        self.conv1d = conv1d

    @property
    def weight(self) -> torch.Tensor:
        """The weight as [out, in] (a transposed view for Conv1D; writes go through)."""
        w = self.module.weight
        return w.t() if self.conv1d else w

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias, shape [out] (the same for Linear and Conv1D), or None."""
        return getattr(self.module, "bias", None)

    def in_features_of(self) -> int:
        return int(self.weight.shape[1])

    def out_features_of(self) -> int:
        return int(self.weight.shape[0])


def get_adapter(model: nn.Module) -> ArchitectureAdapter:
    """The adapter for a loaded causal LM; a clear error for an unsupported architecture."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layout = FAMILIES.get(model_type or "")
    if layout is None:
        supported = ", ".join(sorted(FAMILIES))
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r} "
            f"({type(model).__name__}); supported: {supported}"
        )
    return ArchitectureAdapter(model, layout, model_type)
