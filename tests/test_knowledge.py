"""Shared knowledge-editing pieces: fact schema, token bookkeeping, prefix-cached forwards,
second-moment statistics cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_tokenizer, tiny_model, write_corpus
from pydantic import ValidationError

from modelsurgery.editing.data import DATA_ENV, shared_data_dir
from modelsurgery.editing.knowledge import Fact, StatsSettings, second_moments
from modelsurgery.editing.knowledge import tokens as tk
from modelsurgery.editing.knowledge.runner import (
    CachedPrefix,
    align_lookups,
    hidden_entering,
    logits_at,
    run_base,
    suffix_only,
)
from modelsurgery.editing.registry import MethodContext
from modelsurgery.models.adapters import get_adapter


def test_counterfact_records_are_valid_facts() -> None:
    path = shared_data_dir() / "counterfact" / "counterfact-dev.json"
    if not path.exists():
        pytest.skip("shared CounterFact data not present")
    records = json.loads(path.read_text(encoding="utf-8"))[:50]
    facts = [Fact.model_validate(r) for r in records]
    assert facts[0].text == records[0]["prompt"]
    assert facts[0].target == " " + records[0]["target_new"]
    assert facts[0].true_targets == [" " + records[0]["ground_truth"]]


def test_fact_placeholder_lists_and_errors() -> None:
    fact = Fact(
        prompt="the capital of {} is",
        subject="france",
        target_new="rome",
        rephrase_prompt=["{} capital is", "the city of france is"],
        locality_prompt=["the capital of italy is"],
        locality_ground_truth="rome",
    )
    assert fact.text == "the capital of france is"
    assert fact.rephrase_prompts == ["france capital is", "the city of france is"]
    with pytest.raises(ValidationError, match="prompt"):
        Fact(prompt="the capital is", subject="france", target_new="rome")
    with pytest.raises(ValidationError, match="Extra inputs"):
        Fact(prompt="{} is", subject="france", target_new="rome", target="x")
    with pytest.raises(ValidationError, match="locality_ground_truth"):
        Fact(prompt="{} is", subject="france", target_new="rome", locality_prompt="a b")


def test_subject_last_token_and_answer_positions() -> None:
    tok = build_tiny_tokenizer()
    seq = tk.prompt_with_answer(tok, "the capital of france is", " paris london", "france")
    words = tok.convert_ids_to_tokens(seq.ids)
    assert words[seq.lookup] == "france"
    assert seq.answer_positions == [4, 5]
    assert tk.subject_last_token(tok, "france . the capital of france", "france", 3) == 5


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_suffix_run_matches_full_forward(family: str) -> None:
    model = tiny_model(family)
    adapter = get_adapter(model)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 3, 3, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    rows, cols = torch.tensor([0, 0, 1, 1]), torch.tensor([2, 5, 0, 2])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits[rows, cols]
        entering = hidden_entering(model, adapter, 1, ids, mask)
        with suffix_only(adapter, 1, entering):
            got = logits_at(model, adapter, run_base(model, ids, mask), rows, cols)
        assert not isinstance(adapter.layers()[0], torch.nn.Identity)
        again = logits_at(model, adapter, run_base(model, ids, mask), rows, cols)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_cached_prefix_tail_matches_full_forward(family: str) -> None:
    """Left-aligned lookups + KV-cached prefix + suffix layers == the plain full forward."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    seqs = [
        tk.Sequence(ids=[5, 6, 7, 8, 9, 10, 11], lookup=4),
        tk.Sequence(ids=[12, 13, 14], lookup=1),
        tk.Sequence(ids=[15, 16, 17, 18, 19], lookup=2),
    ]
    batch = align_lookups(seqs, pad_id=3)
    assert batch.split == 4
    assert batch.shift == [0, 3, 2]
    with torch.no_grad():
        tail = CachedPrefix(model, adapter, 1, batch).tail_hidden()
        for row, seq in enumerate(seqs):
            full = model.base_model(input_ids=torch.tensor([seq.ids])).last_hidden_state[0]
            cols = range(seq.lookup, len(seq.ids))
            got = tail[row, [c + batch.shift[row] - batch.split for c in cols]]
            torch.testing.assert_close(got, full[list(cols)], rtol=1e-4, atol=1e-4)


def test_suffix_run_skips_prefix_layers() -> None:
    model = tiny_model("llama")
    adapter = get_adapter(model)
    calls: list[int] = []
    for i in range(2):
        adapter.layer(i).register_forward_hook(lambda *a, i=i: calls.append(i))
    ids = torch.tensor([[5, 6, 7]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        entering = hidden_entering(model, adapter, 1, ids, mask)
        assert calls == [0]
        with suffix_only(adapter, 1, entering):
            run_base(model, ids, mask)
    assert calls == [0, 1]


def test_statistics_cached_per_key_digest_and_layer(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "data"))
    write_corpus(tmp_path / "data")
    model, tok = tiny_model("llama"), build_tiny_tokenizer()
    adapter = get_adapter(model)
    events: list[dict] = []
    context = MethodContext(model_digest="d1", cache_dir=tmp_path / "cache", report=events.append)
    settings = StatsSettings(samples=16, window=32)
    first = second_moments(model, tok, adapter, [0, 1], context, settings)
    computed = [e for e in events if e["message"].endswith("computing")]
    assert computed
    assert first[1].shape == (128, 128)
    torch.testing.assert_close(first[1], first[1].T)
    assert torch.linalg.eigvalsh(first[1]).min() > -1e-8

    events.clear()
    again = second_moments(model, tok, adapter, [1], context, settings)
    assert not [e for e in events if e["message"].endswith("computing")]
    assert any(e["message"].endswith("cache hit") for e in events)
    torch.testing.assert_close(again[1], first[1])

    # An edit of layer 1's own output projection (ROME's, MEMIT's) leaves its keys, and so
    # its statistics, as they were; an edit upstream of it (layer 0's) does not.
    def computed_after(edit: str, layer: int) -> bool:
        with torch.no_grad():
            model.get_parameter(edit).mul_(1.5)
        events.clear()
        second_moments(model, tok, adapter, [layer], context, settings)
        return any(e["message"].endswith("computing") for e in events)

    assert not computed_after("model.layers.1.mlp.down_proj.weight", 1)
    assert not computed_after("model.layers.1.self_attn.q_proj.weight", 0)
    assert computed_after("model.layers.0.mlp.down_proj.weight", 1)
    used = [e for e in events if e["message"].endswith("used")]
    assert used and set(used[0]["statistics"]) == {"1"}


def test_statistics_match_direct_computation(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "data"))
    write_corpus(tmp_path / "data")
    model, tok = tiny_model("gpt2"), build_tiny_tokenizer()
    adapter = get_adapter(model)
    context = MethodContext(model_digest="g", cache_dir=tmp_path / "cache")
    settings = StatsSettings(samples=4, window=16, batch_size=3)
    mom2 = second_moments(model, tok, adapter, [1], context, settings)[1]
    from modelsurgery.editing.data import calibration_windows

    windows = calibration_windows(tok, 4, 16, seed=0)
    keys: list[torch.Tensor] = []
    handle = adapter.mlp_out(1).module.register_forward_pre_hook(
        lambda m, a: keys.append(a[0].reshape(-1, a[0].shape[-1]))
    )
    with torch.no_grad():
        model(windows)
    handle.remove()
    k = keys[0].double()
    torch.testing.assert_close(mom2, k.T @ k / k.shape[0])
