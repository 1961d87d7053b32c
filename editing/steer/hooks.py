"""Steering as forward hooks: for families whose MLP output cannot take a bias, ``bake:
false``, and position-restricted steering. The vector is added to decoder layer outputs.

``positions: all`` adds at every position of every call, which is what a baked bias does.
``positions: generated`` adds only where a new token is predicted: in a prompt (prefill) call
at each row's last attended token, in a cached decoding step at its tokens. A no-cache call
(a plain ``model(ids)``) counts as a prompt call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from modelsurgery.editing.steer.vectors import SteeringVectors
from modelsurgery.models.adapters import get_adapter
from modelsurgery.models.decoding import past_length


class SteeringHandle:
    """Hooks of one attached set of steering vectors; ``remove()`` detaches them."""

    def __init__(self, model: nn.Module, steering: SteeringVectors) -> None:
        adapter = get_adapter(model)
        if steering.vectors.shape[-1] != adapter.hidden_size:
            raise ValueError(
                f"steering vectors have size {steering.vectors.shape[-1]}, "
                f"the model's hidden size is {adapter.hidden_size}"
            )
        for layer in steering.layers:
            if not 0 <= layer < adapter.num_layers:
                raise ValueError(
                    f"steering layer {layer} out of range (model has {adapter.num_layers})"
                )
        device = next(model.parameters()).device
        self._vectors = steering.vectors.to(device)
        self._layers = list(steering.layers)
        self._generated_only = steering.positions == "generated"
        self._where: torch.Tensor | None = None  # (B, T) 0/1 where to add, for "generated"
        stack = model.get_submodule(adapter.layout.layers.rsplit(".", 1)[0])
        self._hooks: list[RemovableHandle] = []
        if self._generated_only:
            self._hooks.append(
                stack.register_forward_pre_hook(self._before_stack, with_kwargs=True)
            )
        for slot, layer in enumerate(self._layers):
            self._hooks.append(adapter.layer(layer).register_forward_hook(self._layer_hook(slot)))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _before_stack(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        batch, seq_len = int(tokens.shape[0]), int(tokens.shape[1])
        where = torch.zeros(batch, seq_len, device=tokens.device)
        if past_length(args, kwargs) > 0:
            where[:] = 1.0  # a decoding step: every token of the call is a new one
        else:
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                columns = torch.arange(mask.shape[1], device=mask.device)
                last = (columns * mask.bool()).amax(dim=1)[:, None] - (mask.shape[1] - seq_len)
            else:
                last = torch.full((batch, 1), seq_len - 1, device=tokens.device)
            where.scatter_(1, last.long().clamp(0, seq_len - 1), 1.0)
        self._where = where

    def _layer_hook(self, slot: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output  # (B, T, H)
            vector = self._vectors[slot].to(hidden.dtype)  # (H,)
            if self._generated_only and self._where is not None:
                steered = hidden + self._where[..., None].to(hidden.dtype) * vector
            else:
                steered = hidden + vector
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        return hook


def attach(model: nn.Module, steering: SteeringVectors) -> SteeringHandle:
    return SteeringHandle(model, steering)
