"""Keys (down-projection inputs at the subject, averaged over context templates) and the
residual-stream output of a later layer at the bare prompt's subject, for many facts at once."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from modelsurgery.models.adapters import ArchitectureAdapter

from . import tokens as tk
from .facts import Fact
from .runner import (
    at_positions,
    capture_input,
    capture_output,
    hidden_entering,
    run_until_stopped,
    suffix_only,
)
from .templates import prefix_length, with_bare_first


def _through_subject(seq: tk.Sequence) -> tk.Sequence:
    """The sequence cut after the subject's last token: everything read there depends only on
    the tokens up to it (causal attention), so the rest of the prompt is never run."""
    return tk.Sequence(ids=seq.ids[: seq.lookup + 1], lookup=seq.lookup)


@torch.no_grad()
def keys_and_outputs(
    model: nn.Module,
    tokenizer: Any,
    adapter: ArchitectureAdapter,
    facts: Sequence[Fact],
    *,
    key_layer: int,
    out_layer: int,
    templates: Sequence[str],
    batch_facts: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([F, d_in] averaged keys at ``key_layer``, [F, d] outputs of ``out_layer``); only the
    layers up to ``out_layer`` run."""
    device = next(model.parameters()).device
    ordered = with_bare_first(tuple(templates))
    keys_out, outs_out = [], []
    for start in range(0, len(facts), batch_facts):
        chunk = facts[start : start + batch_facts]
        seqs = [
            _through_subject(
                tk.subject_prompt(
                    tokenizer, t.replace("{}", fact.text), fact.subject, prefix_length(t)
                )
            )
            for fact in chunk
            for t in ordered
        ]
        ids, mask = tk.pad_batch(seqs, tk.pad_id_of(tokenizer))
        rows = torch.arange(len(seqs), device=device)
        cols = torch.tensor([s.lookup for s in seqs], device=device)
        got: dict[str, torch.Tensor] = {}
        with (
            capture_input(
                adapter.mlp_out(key_layer).module, lambda k, got=got: got.setdefault("k", k)
            ),
            capture_output(
                adapter.layer(out_layer), lambda h, got=got: got.setdefault("h", h), stop=True
            ),
        ):
            run_until_stopped(model, ids.to(device), mask.to(device))
        keys = at_positions(got["k"], rows, cols).float().view(len(chunk), len(ordered), -1)
        outs = at_positions(got["h"], rows, cols).float().view(len(chunk), len(ordered), -1)
        keys, outs = keys.mean(1), outs[:, 0]
        keys_out.append(keys)
        outs_out.append(outs)
    return torch.cat(keys_out), torch.cat(outs_out)


class KeyWalk:
    """Keys and outputs of MEMIT's layer-by-layer solve without rerunning the layers below.

    ``keys_and_outputs`` runs every layer up to the last edited one for each edited layer
    (7 layers: 56 layer passes over every templated prompt). Here the hidden states entering
    the current layer are kept for every templated prompt, cut after the subject [rows, T, d];
    a layer's keys come from running that one layer, the last layer's outputs from running
    the bare prompts (one row in ``len(templates)``) up to it, and ``advance`` runs the
    current layer once more after its update to move on (SmolLM2, 7 layers: about 16 layer
    passes over every prompt)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        adapter: ArchitectureAdapter,
        facts: Sequence[Fact],
        *,
        first_layer: int,
        templates: Sequence[str],
        batch_rows: int = 192,
    ) -> None:
        self.model, self.adapter, self.batch_rows = model, adapter, batch_rows
        self.per_fact = len(with_bare_first(tuple(templates)))
        seqs = [
            _through_subject(
                tk.subject_prompt(
                    tokenizer, t.replace("{}", fact.text), fact.subject, prefix_length(t)
                )
            )
            for fact in facts
            for t in with_bare_first(tuple(templates))
        ]
        device = next(model.parameters()).device
        self.ids, self.mask = (t.to(device) for t in tk.pad_batch(seqs, tk.pad_id_of(tokenizer)))
        self.lookups = torch.tensor([s.lookup for s in seqs], device=device)
        self.layer = first_layer
        self.entering = torch.cat(
            [
                hidden_entering(model, adapter, first_layer, self.ids[b], self.mask[b])
                for b in self._batches(len(seqs))
            ]
        )

    def _batches(self, rows: int) -> list[slice]:
        return [slice(s, s + self.batch_rows) for s in range(0, rows, self.batch_rows)]

    @torch.no_grad()
    def _run(
        self, rows: torch.Tensor | slice, last: int, module: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layers ``self.layer``..``last`` on the kept states of ``rows``: ``last``'s output
        [n, T, d] and, given ``module``, its input at the lookups [n, in]."""
        outs, ins = [], []
        ids, mask = self.ids[rows], self.mask[rows]
        # The kept states sit on the device of the layer they enter.
        entering = self.entering[
            rows.to(self.entering.device) if isinstance(rows, torch.Tensor) else rows
        ]
        lookups = self.lookups[rows]
        for b in self._batches(ids.shape[0]):
            got: dict[str, torch.Tensor] = {}
            with ExitStack() as stack:
                stack.enter_context(suffix_only(self.adapter, self.layer, entering[b]))
                if module is not None:
                    stack.enter_context(
                        capture_input(module, lambda k, g=got: g.setdefault("k", k))
                    )
                stack.enter_context(
                    capture_output(
                        self.adapter.layer(last), lambda h, g=got: g.setdefault("h", h), stop=True
                    )
                )
                run_until_stopped(self.model, ids[b], mask[b])
            outs.append(got["h"])
            if module is not None:
                at = torch.arange(got["k"].shape[0], device=got["k"].device)
                ins.append(at_positions(got["k"], at, lookups[b]).float())
        return torch.cat(outs), (torch.cat(ins) if ins else None)

    def keys(self) -> torch.Tensor:
        """The current layer's keys, averaged over the templates [F, in]."""
        _, keys = self._run(slice(None), self.layer, self.adapter.mlp_out(self.layer).module)
        assert keys is not None
        return keys.view(-1, self.per_fact, keys.shape[1]).mean(1)

    def outputs(self, out_layer: int) -> torch.Tensor:
        """Layer ``out_layer``'s output at each bare prompt's subject [F, d]."""
        bare = torch.arange(0, self.ids.shape[0], self.per_fact, device=self.ids.device)
        hidden, _ = self._run(bare, out_layer)
        at = torch.arange(hidden.shape[0], device=hidden.device)
        return at_positions(hidden, at, self.lookups[bare]).float()

    def advance(self, to_layer: int) -> None:
        """Move the kept states to those entering ``to_layer`` (after the updates so far)."""
        if to_layer > self.layer:
            self.entering, _ = self._run(slice(None), to_layer - 1)
            self.layer = to_layer
