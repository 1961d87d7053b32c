"""v*'s early stopping: finished facts leave the batch's forward (their results unchanged), and
the most-probable stop ends a fact once its answers are on top, with a shorter delta."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from conftest import build_editable, build_tiny_tokenizer, tiny_model
from test_fan_out import MORE_FACTS
from test_rome import context

from modelsurgery.editing.knowledge import tokens as tk
from modelsurgery.editing.knowledge.facts import Fact
from modelsurgery.editing.knowledge.runner import CachedPrefix, align_lookups
from modelsurgery.editing.knowledge.vstar import VStarParams, optimize_deltas
from modelsurgery.models.adapters import get_adapter

LAYER = 0
TEMPLATES = ("{}", "it is big . {}")
PARAMS = VStarParams(
    steps=40, lr=1.0, kl_factor=0.0625, weight_decay=1e-4, clamp_factor=100.0, early_stop_loss=3.0
)


def deltas(facts: list[dict], tmp_path: Path, params: VStarParams = PARAMS):
    model = build_editable("llama", seed=3)
    return optimize_deltas(
        model,
        build_tiny_tokenizer(),
        get_adapter(model),
        [Fact.model_validate(f) for f in facts],
        layer=LAYER,
        site="layer",
        params=params,
        templates=TEMPLATES,
        context=context(tmp_path),
    )


def test_tail_of_some_rows_equals_those_rows_of_the_whole_tail() -> None:
    model = tiny_model("llama")
    seqs = [
        tk.Sequence(ids=[5, 6, 7, 8, 9, 10, 11], lookup=4),
        tk.Sequence(ids=[12, 13, 14], lookup=1),
        tk.Sequence(ids=[15, 16, 17, 18, 19], lookup=2),
    ]
    prefix = CachedPrefix(model, get_adapter(model), 1, align_lookups(seqs, pad_id=3))
    with torch.no_grad():
        whole = prefix.tail_hidden()
        some = prefix.tail_hidden(torch.tensor([2, 0]))
        torch.testing.assert_close(some, whole[[2, 0]], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prefix.tail_hidden(), whole)


def test_facts_finishing_at_different_steps_get_what_they_get_alone(
    tmp_path: Path, one_thread: None
) -> None:
    together = deltas(MORE_FACTS, tmp_path)
    assert len(set(together.steps)) > 1, together.steps
    for i, fact in enumerate(MORE_FACTS):
        alone = deltas([fact], tmp_path)
        assert alone.steps == [together.steps[i]]
        torch.testing.assert_close(alone.deltas[0], together.deltas[i], rtol=1e-4, atol=1e-4)


def test_most_probable_stop_is_earlier_and_shorter(tmp_path: Path, one_thread: None) -> None:
    strict = dataclasses.replace(PARAMS, early_stop_loss=0.3)
    by_loss = deltas(MORE_FACTS, tmp_path, strict)
    on_top = deltas(MORE_FACTS, tmp_path, dataclasses.replace(strict, stop_when_most_probable=True))
    assert sum(on_top.steps) < sum(by_loss.steps), (on_top.steps, by_loss.steps)
    assert all(a <= b for a, b in zip(on_top.steps, by_loss.steps, strict=True))
    shorter = on_top.deltas.norm(dim=-1) <= by_loss.deltas.norm(dim=-1) + 1e-6
    assert shorter.all()
