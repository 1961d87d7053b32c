"""Forward passes that do only the work an edit needs.

- ``hidden_entering``: run the frozen layers below ``layer`` once and keep the hidden states
  that enter it (the forward is stopped there by raising from a hook).
- ``suffix_only``: while active, the layers below ``layer`` are pass-throughs and ``layer``
  receives the cached states, so the model's own forward still builds position embeddings
  (rotary or learned), the causal/sliding masks and per-layer types, but runs only the layers
  from ``layer`` up. This keeps every family's own layer code in charge (no re-implemented
  attention) while skipping the prefix.
- ``CachedPrefix``: sequences are left-padded so that every subject's last token sits in one
  column ``split``; columns before it never change during an optimisation (the delta enters at
  ``split``), so their keys/values are computed once into a KV cache and each step runs only
  the tail columns through the layers from ``layer`` up.
- ``logits_at``: final hidden states -> logits only at the positions a loss reads.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from modelsurgery.models.adapters import ArchitectureAdapter

from . import tokens as tk


class StopForward(Exception):
    """Raised from a hook once everything needed from a forward pass was captured."""


def _hidden_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def run_base(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor | None = None,
    cache: DynamicCache | None = None,
) -> torch.Tensor:
    """Final (normed) hidden states from the base transformer, [batch, seq, hidden]."""
    base = model.base_model
    return base(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=cache is not None,
        **{_cache_keyword(type(base)): cache},
    ).last_hidden_state


@lru_cache(maxsize=64)
def _cache_keyword(stack: type) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(stack.forward).parameters else "past_key_values"


def run_until_stopped(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor | None = None,
    cache: DynamicCache | None = None,
) -> None:
    """Run the base transformer until a hook raises ``StopForward`` (or to the end)."""
    with suppress(StopForward):
        run_base(model, ids, mask, positions, cache)


@torch.no_grad()
def hidden_entering(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    layer: int,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor | None = None,
    cache: DynamicCache | None = None,
) -> torch.Tensor:
    """Hidden states entering decoder layer ``layer`` (only layers below it run)."""
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append(_hidden_arg(args, kwargs).detach())
        raise StopForward

    handle = adapter.layer(layer).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run_until_stopped(model, ids, mask, positions, cache)
    finally:
        handle.remove()
    return captured[0]


@dataclass
class Aligned:
    """Sequences left-padded so their lookup tokens share column ``split``; ``shift[r]`` is
    row r's left padding (original position p is column p + shift[r])."""

    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    split: int
    shift: list[int]


def align_lookups(seqs: Sequence[tk.Sequence], pad_id: int) -> Aligned:
    split = max(s.lookup for s in seqs)
    shift = [split - s.lookup for s in seqs]
    width = max(len(s.ids) + p for s, p in zip(seqs, shift, strict=True))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (seq, pad) in enumerate(zip(seqs, shift, strict=True)):
        ids[row, pad : pad + len(seq.ids)] = torch.tensor(seq.ids, dtype=torch.long)
        mask[row, pad : pad + len(seq.ids)] = 1
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    return Aligned(ids, mask, positions, split, shift)


class CachedPrefix:
    """KV cache of the columns before ``split`` (all layers) and the hidden states entering
    ``layer`` for the tail columns; ``tail_hidden`` then runs only layers >= ``layer`` on the
    tail. Cache tensors are restored before and after each pass, so autograd graphs of
    successive steps never share a tensor."""

    def __init__(
        self, model: nn.Module, adapter: ArchitectureAdapter, layer: int, batch: Aligned
    ) -> None:
        self.model, self.adapter, self.layer, self.batch = model, adapter, layer, batch
        self.cache: DynamicCache | None = None
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        c = batch.split
        with torch.no_grad():
            if c > 0:
                self.cache = DynamicCache()
                ids, mask, pos = batch.ids[:, :c], batch.mask[:, :c], batch.positions[:, :c]
                run_base(model, ids, mask, pos, self.cache)
                self._saved = [(lay.keys, lay.values) for lay in self.cache.layers]
            self.entering = hidden_entering(
                model, adapter, layer, *self._tail_inputs(), cache=self.cache
            )
        self._restore()

    def _tail_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.batch.split
        return self.batch.ids[:, c:], self.batch.mask, self.batch.positions[:, c:]

    def _restore(self, rows: torch.Tensor | None = None) -> None:
        if self.cache is not None:
            for lay, (keys, values) in zip(self.cache.layers, self._saved, strict=True):
                if rows is not None:  # each layer's cache lives on that layer's device
                    keys, values = keys[rows.to(keys.device)], values[rows.to(values.device)]
                lay.keys, lay.values = keys, values

    def tail_hidden(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states of the tail columns, [batch, width - split, hidden], of ``rows``
        only when given (the sequences are independent, so the others are simply left out)."""
        self._restore(rows)
        ids, mask, positions = self._tail_inputs()
        entering = self.entering
        if rows is not None:
            ids, mask, positions = ids[rows], mask[rows], positions[rows]
            entering = entering[rows.to(entering.device)]  # on the device of its layer
        try:
            with suffix_only(self.adapter, self.layer, entering):
                return run_base(self.model, ids, mask, positions, self.cache)
        finally:
            self._restore()


class _PassThrough(nn.Module):
    """Stands in for a skipped decoder layer: returns the hidden states it is given."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        for name in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(original, name):
                setattr(self, name, getattr(original, name))

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _hidden_arg(args, kwargs)


@contextmanager
def suffix_only(adapter: ArchitectureAdapter, layer: int, entering: torch.Tensor) -> Iterator[None]:
    """Within the block, base forwards skip layers < ``layer`` and feed ``entering`` to it."""
    layers = adapter.layers()
    originals = [layers[i] for i in range(layer)]

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            return (entering, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": entering}

    for i, original in enumerate(originals):
        layers[i] = _PassThrough(original)
    handle = layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for i, original in enumerate(originals):
            layers[i] = original


def at_positions(states: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``states[rows, cols]`` with the indices moved to the states' device: each layer of a
    model placed over several devices gives its states on its own."""
    return states[rows.to(states.device), cols.to(states.device)]


def logits_at(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    hidden: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:
    """Logits [n, vocab] at (row, col) positions of final hidden states (lm head on those only),
    on the positions' device (the head may live on another device of a placed model)."""
    logits = adapter.lm_head()(at_positions(hidden, rows, cols))
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float().to(rows.device)


@contextmanager
def output_edit(module: nn.Module, edit: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace a module's (first) output by ``edit(output)`` while active."""

    def hook(mod: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (edit(output[0]), *output[1:])
        return edit(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def capture_input(
    module: nn.Module, sink: Callable[[torch.Tensor], None], *, stop: bool = False
) -> Iterator[None]:
    """Hand a module's first input to ``sink`` on every call (then stop the forward if asked)."""

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sink(_hidden_arg(args, kwargs))
        if stop:
            raise StopForward

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def capture_output(
    module: nn.Module, sink: Callable[[torch.Tensor], None], *, stop: bool = False
) -> Iterator[None]:
    def hook(mod: nn.Module, args: Any, output: Any) -> None:
        sink(_first(output))
        if stop:
            raise StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
