"""Forward hooks that apply ReFT interventions inside ordinary ``model(...)`` and
``model.generate(...)`` calls.

Rule: a forward call of the decoder stack is a *prompt call* when nothing precedes its tokens:
the cache it gets is empty (whatever the keyword: ``past_key_values`` before transformers 5.24,
``cache`` after), its ``cache_position`` starts at 0 where given, and its 2-D attention mask
covers only its own tokens (a decoding step's mask also covers the past).
This is the prefill call of ``generate``.
Only prompt calls are intervened on, at the positions ``positions.prompt_positions`` picks
from that call's prompt; cached decoding steps of new tokens are left alone (they are not
prompt positions), yet they see the intervened prompt through the cache. Each row's prompt is
the span its 2-D attention mask covers, so left and right padding both work; a mask with
holes is refused. Chunked prefill (a prompt split over several calls) is not supported: the
later chunks see a non-empty cache and would not be intervened on.

``handle.prompt_lengths([...])`` overrides the prompt length for no-cache recomputation and
training (a prompt + completion sequence whose prompt is its first n tokens).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from modelsurgery.editing.reft.interventions import ReftInterventions
from modelsurgery.editing.reft.positions import batch_positions
from modelsurgery.models.adapters import get_adapter
from modelsurgery.models.decoding import past_length


class InterventionHandle:
    """Hooks of one attached ReFT version; ``remove()`` detaches them."""

    def __init__(self, model: nn.Module, interventions: ReftInterventions) -> None:
        adapter = get_adapter(model)
        spec = interventions.spec
        if adapter.hidden_size != spec.hidden_size:
            raise ValueError(
                f"interventions were trained for hidden size {spec.hidden_size}, "
                f"the model has {adapter.hidden_size}"
            )
        for layer in spec.layers:
            if not 0 <= layer < adapter.num_layers:
                raise ValueError(
                    f"intervention layer {layer} out of range "
                    f"(model has {adapter.num_layers} layers)"
                )
        self.model = model
        self.interventions = interventions
        self._first, self._last = spec.first_last
        self._share = spec.share_weights
        self._override: list[int] | None = None
        self._active: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._seq_len = 0
        stack_path = adapter.layout.layers.rsplit(".", 1)[0]
        stack = model.get_submodule(stack_path)
        self._hooks: list[RemovableHandle] = [
            stack.register_forward_pre_hook(self._before_stack, with_kwargs=True),
            stack.register_forward_hook(self._after_stack, always_call=True),
        ]
        for layer in spec.layers:
            self._hooks.append(adapter.layer(layer).register_forward_hook(self._layer_hook(layer)))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._active = None

    @contextmanager
    def prompt_lengths(self, lengths: Sequence[int]) -> Iterator[None]:
        """Within the block, prompt calls take row b's prompt to be its first ``lengths[b]``
        attended tokens instead of all of them."""
        self._override = list(lengths)
        try:
            yield
        finally:
            self._override = None

    # --- hooks -----------------------------------------------------------------------------
    def _before_stack(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._active = None
        if not _is_prompt_call(args, kwargs):
            return
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"]
        batch, seq_len = int(tokens.shape[0]), int(tokens.shape[1])
        starts, lengths = _prompt_spans(kwargs.get("attention_mask"), batch, seq_len)
        if self._override is not None:
            if len(self._override) != batch:
                raise ValueError(
                    f"prompt_lengths has {len(self._override)} entries for a batch of {batch}"
                )
            for b, (given, span) in enumerate(zip(self._override, lengths, strict=True)):
                if not 0 < given <= span:
                    raise ValueError(f"prompt_lengths[{b}] = {given} outside 1..{span}")
            lengths = list(self._override)
        self._seq_len = seq_len
        self._active = batch_positions(
            starts, lengths, self._first, self._last, self._share, device=tokens.device
        )

    def _after_stack(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._active = None

    def _layer_hook(self, layer: int) -> Any:
        slots = self.interventions.at(layer)

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if self._active is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.shape[1] != self._seq_len:
                raise RuntimeError(
                    f"layer {layer} output has {hidden.shape[1]} positions, "
                    f"the prompt call had {self._seq_len}"
                )
            edited = hidden
            for slot, (index, valid) in self._active.items():
                if index.shape[1] == 0:
                    continue
                # On a model placed over several devices each layer has its own.
                index, valid = index.to(hidden.device), valid.to(hidden.device)
                gather_index = index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
                selected = hidden.gather(1, gather_index)
                delta = slots[slot].delta(selected) * valid.unsqueeze(-1)
                edited = edited.scatter_add(1, gather_index, delta.to(hidden.dtype))
            if isinstance(output, tuple):
                return (edited, *output[1:])
            return edited

        return hook


def _is_prompt_call(args: tuple, kwargs: dict[str, Any]) -> bool:
    return past_length(args, kwargs) == 0


def _prompt_spans(
    mask: torch.Tensor | None, batch: int, seq_len: int
) -> tuple[list[int], list[int]]:
    """Per row, where its tokens start and how many there are (from a 2-D attention mask)."""
    if mask is None:
        return [0] * batch, [seq_len] * batch
    if mask.dim() != 2 or mask.shape != (batch, seq_len):
        raise ValueError(
            f"ReFT interventions need a 2-D attention mask of shape {(batch, seq_len)}, "
            f"got {tuple(mask.shape)}"
        )
    starts, lengths = [], []
    for b, row in enumerate(mask.bool()):
        attended = row.nonzero().flatten()
        if attended.numel() == 0:
            raise ValueError(f"row {b} of the batch has no attended token")
        start, end = int(attended[0]), int(attended[-1]) + 1
        if end - start != attended.numel():
            raise ValueError(
                f"row {b}'s attention mask has holes; ReFT needs each prompt contiguous "
                "(left or right padding only)"
            )
        starts.append(start)
        lengths.append(end - start)
    return starts, lengths


def attach(model: nn.Module, interventions: ReftInterventions) -> InterventionHandle:
    """Register the interventions on ``model`` (moved to the model's device)."""
    device = next(model.parameters()).device
    interventions.to(device)
    return InterventionHandle(model, interventions)
