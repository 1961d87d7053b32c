"""The concept bottleneck on top of a frozen language model: per-concept masked passes over
the upper decoder layers, concept heads and a label head.

The layers below the lowest masked one are frozen: ``layer_inputs`` runs them once per batch
and keeps what the lowest masked layer receives (hidden states and the layer's keyword
arguments: attention mask, rotary embeddings ...), so training and intervention only ever run
the upper layers. The masked layers' linear weights are the bottleneck's own trainable copies;
the model's weights stay untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from torch.func import functional_call

from modelsurgery.editing.concepts.config import LabelInput
from modelsurgery.models.adapters import get_adapter


class BottleneckSpec(BaseModel):
    """What ``concepts/config.json`` records: enough to rebuild the bottleneck on its model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = 1
    concepts: list[str]
    values: list[str]
    labels: list[str]
    layers: list[int]
    # Per masked layer, the linear weights (paths relative to the layer) that carry masks.
    weights: list[str]
    hidden_size: int
    num_layers: int
    model_type: str
    max_tokens: int
    sparse: bool = True
    # Versions written before the field existed read probabilities.
    label_input: LabelInput = "probabilities"


@dataclass
class LayerInputs:
    """What the lowest masked layer receives for one batch, and which tokens are real."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]
    token_mask: torch.Tensor  # [batch, tokens], 1 on real tokens


class _Captured(Exception):
    pass


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    return value


def encode(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> Any:
    """The tokenizer's batch for ``texts``: right-padded, cut to ``max_tokens``."""
    return tokenizer(
        list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_tokens
    )


def first_layer_input(
    model: nn.Module, first: int, **model_inputs: Any
) -> tuple[torch.Tensor, dict[str, Any]]:
    """What layer ``first`` receives (hidden states, keyword arguments) when the model runs
    on ``model_inputs``; the layers from ``first`` on are never run. Autograd records it
    unless the caller turns it off (token attribution differentiates through it)."""
    captured: dict[str, Any] = {}

    def grab(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        captured["hidden"], captured["kwargs"] = args[0] if args else None, kwargs
        raise _Captured

    handle = get_adapter(model).layer(first).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**model_inputs, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    kwargs = dict(captured["kwargs"])
    hidden = captured["hidden"]
    if hidden is None:
        hidden = kwargs.pop("hidden_states")
    return hidden, kwargs


@torch.no_grad()
def layer_inputs(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], first: int, max_tokens: int
) -> LayerInputs:
    """Run the frozen layers below ``first`` on ``texts`` (right-padded, cut to
    ``max_tokens``) and keep the input of layer ``first``."""
    device = next(model.parameters()).device
    encoded = encode(tokenizer, texts, max_tokens)
    hidden, kwargs = first_layer_input(
        model,
        first,
        input_ids=encoded.input_ids.to(device),
        attention_mask=encoded.attention_mask.to(device),
    )
    kwargs = {k: _detached(v) for k, v in kwargs.items()}
    return LayerInputs(hidden.detach(), kwargs, encoded.attention_mask.to(device))


def _linear_weights(layer: nn.Module) -> list[str]:
    """Weight paths of the layer's linear maps (nn.Linear and GPT-2's Conv1D)."""
    names = []
    for path, module in layer.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            names.append(f"{path}.weight")
    return names


def _key(layer: int, name: str) -> str:
    return f"{layer}.{name}"


class ConceptBottleneck(nn.Module):
    """Masks (one per concept and weight), trainable masked weights, concept and label
    heads. ``masks`` is None for a dense CBM: one pass feeds every concept head."""

    def __init__(self, spec: BottleneckSpec, model: nn.Module) -> None:
        super().__init__()
        adapter = get_adapter(model)
        if adapter.hidden_size != spec.hidden_size or adapter.num_layers != spec.num_layers:
            raise ValueError(
                f"the concept bottleneck was trained for hidden size {spec.hidden_size} and "
                f"{spec.num_layers} layers; the model has {adapter.hidden_size} and "
                f"{adapter.num_layers}"
            )
        self.spec = spec
        self.first = min(spec.layers)
        self.weight_keys = [_key(i, name) for i in spec.layers for name in spec.weights]
        self.weights = nn.ParameterList(
            nn.Parameter(
                model.get_submodule(adapter.layout.layers)[i].get_parameter(name).detach().clone()
            )
            for i in spec.layers
            for name in spec.weights
        )
        self.masks: list[torch.Tensor] | None = None
        if spec.sparse:
            self.masks = [
                torch.ones((len(spec.concepts), *w.shape), dtype=torch.bool) for w in self.weights
            ]
        values, hidden = len(spec.values), spec.hidden_size
        # Standardised pooled states: a few huge residual dimensions would otherwise dominate.
        self.concept_heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden, elementwise_affine=False), nn.Linear(hidden, values))
            for _ in spec.concepts
        )
        self.label_head = nn.Linear(len(spec.concepts) * values, len(spec.labels))
        # The model's modules this bottleneck runs; a tuple keeps them out of its state.
        self._frozen = (
            [adapter.layer(i) for i in range(self.first, spec.num_layers)],
            adapter.final_norm(),
        )

    def to_model_devices(self, model: nn.Module) -> ConceptBottleneck:
        """Each masked weight and its masks beside the layer that runs them, the heads where
        the final norm's output comes out: one device, or a placed model's several."""
        norm = next(self._frozen[1].parameters(), None)
        out = (norm if norm is not None else next(model.parameters())).device
        self.concept_heads.to(out)
        self.label_head.to(out)
        if self.masks is not None:
            self.set_masks(self.masks)
        return self

    def set_masks(self, masks: Sequence[torch.Tensor]) -> None:
        """The concept masks [K, *shape] of each masked weight, each beside its weight."""
        self.masks = [m.to(w.device) for w, m in zip(self.weights, masks, strict=True)]

    def concept_weights(
        self, concept: int, masks: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """The masked weights concept ``concept``'s pass uses (W * M_k), or ``masks`` given
        as float tensors (intervention differentiates through them)."""
        if masks is not None:
            return [w * m for w, m in zip(self.weights, masks, strict=True)]
        if self.masks is None:
            return list(self.weights)
        return [w * m[concept] for w, m in zip(self.weights, self.masks, strict=True)]

    def pooled(self, inputs: LayerInputs, weights: Sequence[torch.Tensor]) -> torch.Tensor:
        """Run the upper layers with ``weights`` in place of the masked ones; the mean over
        real tokens of the final-norm output."""
        per_layer: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in zip(self.weight_keys, weights, strict=True):
            layer, name = key.split(".", 1)
            per_layer.setdefault(int(layer), {})[name] = tensor
        layers, norm = self._frozen
        hidden = inputs.hidden
        for offset, layer in enumerate(layers):
            own = per_layer.get(self.first + offset)
            if own is None:
                out = layer(hidden, **inputs.kwargs)
            else:
                out = functional_call(layer, own, (hidden,), inputs.kwargs, strict=False)
            hidden = out[0] if isinstance(out, tuple) else out
        hidden = norm(hidden).float()
        mask = inputs.token_mask.unsqueeze(-1).to(hidden.device, hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def concept_logits(
        self, inputs: LayerInputs, effective: list[list[torch.Tensor]] | None = None
    ) -> list[torch.Tensor]:
        """Per concept [batch, values]. ``effective`` collects each pass's masked weights."""
        if self.masks is None:
            pooled = self.pooled(inputs, self.concept_weights(0))
            return [head(pooled) for head in self.concept_heads]
        logits = []
        for k, head in enumerate(self.concept_heads):
            weights = self.concept_weights(k)
            if effective is not None:
                effective.append(weights)
            logits.append(head(self.pooled(inputs, weights)))
        return logits

    def label_logits(self, concept_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """The joint bottleneck: the label from the concept heads' outputs alone (their
        logits, or their probabilities as ``spec.label_input`` says)."""
        if self.spec.label_input == "probabilities":
            concept_logits = [c.softmax(-1) for c in concept_logits]
        return self.label_head(torch.cat(list(concept_logits), dim=-1))

    def mask_density(self) -> float:
        if self.masks is None:
            return 1.0
        kept = sum(int(m.sum()) for m in self.masks)
        return kept / sum(m.numel() for m in self.masks)

    def mask_overlap(self) -> dict[int, float]:
        """Per masked layer, the mean pairwise Jaccard overlap of the concept masks."""
        if self.masks is None or len(self.spec.concepts) < 2:
            return {}
        out = {}
        per = len(self.spec.weights)
        for j, layer in enumerate(self.spec.layers):
            masks = self.masks[j * per : (j + 1) * per]
            flat = torch.cat([m.flatten(1) for m in masks], dim=1)
            scores = []
            for a in range(flat.shape[0]):
                for b in range(a + 1, flat.shape[0]):
                    inter = (flat[a] & flat[b]).sum().item()
                    union = (flat[a] | flat[b]).sum().item()
                    scores.append(inter / union if union else 1.0)
            out[layer] = sum(scores) / len(scores)
        return out


def new_spec(
    model: nn.Module,
    concepts: Sequence[str],
    values: Sequence[str],
    labels: Sequence[str],
    layers: Sequence[int],
    max_tokens: int,
    sparse: bool,
    label_input: LabelInput,
) -> BottleneckSpec:
    adapter = get_adapter(model)
    return BottleneckSpec(
        concepts=list(concepts),
        values=list(values),
        labels=list(labels),
        layers=sorted(layers),
        weights=_linear_weights(adapter.layer(min(layers))),
        hidden_size=adapter.hidden_size,
        num_layers=adapter.num_layers,
        model_type=model.config.model_type,
        max_tokens=max_tokens,
        sparse=sparse,
        label_input=label_input,
    )
