"""The iti method: config validation, probes on a planted head, the bias bake against the
hook it replaces, export as plain weights, and runs on tiny Llama and GPT-2."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, MistralConfig

import modelsurgery.editing.iti  # noqa: F401  (registers the method)
from modelsurgery.editing.data import split_indices
from modelsurgery.editing.iti.method import bake_head_shifts
from modelsurgery.editing.iti.probes import (
    fit_probes,
    head_shifts,
    mass_mean_directions,
    rank_heads,
)
from modelsurgery.editing.iti.records import (
    QARecord,
    answer_logprobs,
    mc_accuracy,
    mc_correct,
)
from modelsurgery.editing.mask_heads import parse_head
from modelsurgery.editing.registry import MethodContext, get_method
from modelsurgery.models import load
from modelsurgery.models.adapters import get_adapter
from modelsurgery.models.digest import persistent_state_dict

PROMPT = "the capital of france is paris"
COUNTRIES = [
    ("france", "paris", "rome"),
    ("england", "london", "berlin"),
    ("italy", "rome", "madrid"),
    ("germany", "berlin", "tokyo"),
    ("spain", "madrid", "paris"),
    ("japan", "tokyo", "london"),
]
RECORDS = [
    {"question": f"the capital of {c} is ?", "true": t, "false": [f, "a big city"]}
    for c, t, f in COUNTRIES
]
PAIRS = [
    {"positive": f"the capital of {c} is {t} .", "negative": f"the capital of {c} is {f} ."}
    for c, t, f in COUNTRIES
]


def context(tmp_path: Path, roots: tuple[Path, ...] = ()) -> MethodContext:
    return MethodContext(model_digest="test", cache_dir=tmp_path / "cache", data_roots=roots)


def logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    ids = torch.tensor([tokenizer(PROMPT).input_ids])
    with torch.no_grad():
        return model(ids).logits


def test_config_validation(tiny_llama) -> None:
    config_class = get_method("iti").config_class
    config = config_class(records=RECORDS)
    assert config.records is not None and config.records[0].true == ["paris"]
    assert config.metric_names() == {
        "heads_shifted",
        "probe_accuracy_mean",
        "probe_accuracy_best",
        "texts_fit",
        "texts_heldout",
        "mc1_before",
        "mc1_after",
    }
    assert "mc1_before" not in config_class(pairs=PAIRS, evaluate_perplexity=False).metric_names()
    with pytest.raises(ValidationError, match="give exactly one of"):
        config_class()
    with pytest.raises(ValidationError, match="records: give exactly one of"):
        config_class(pairs=PAIRS, records=RECORDS)
    with pytest.raises(ValidationError, match="pairs: at least 3"):
        config_class(pairs=PAIRS[:2])
    with pytest.raises(ValidationError, match="records: at least 2"):
        config_class(records=RECORDS[:1])
    with pytest.raises(ValidationError, match="an answer is empty"):
        config_class(records=[{"question": "q", "true": " ", "false": "b"}] * 2)
    for bad in ({"top_k": 0}, {"alpha": 0.0}, {"probe_holdout_fraction": 1.0}, {"token": "x"}):
        with pytest.raises(ValidationError):
            config_class(records=RECORDS, **bad)
    with pytest.raises(ValidationError, match=r"layers\[1\]: layer 0 is listed twice"):
        config_class(records=RECORDS, layers=[0, 0])
    with pytest.raises(ValidationError, match="unknown_key"):
        config_class(records=RECORDS, unknown_key=1)

    with pytest.raises(ValueError, match=r"^layers\[1\]: layer 2 out of range"):
        config_class(records=RECORDS, layers=[1, 2]).check_against(tiny_llama.config)
    with pytest.raises(ValueError, match=r"^top_k: 5 exceeds the 4 heads probed"):
        config_class(records=RECORDS, layers=[1], top_k=5).check_against(tiny_llama.config)
    config_class(records=RECORDS, layers=[1], top_k=4).check_against(tiny_llama.config)
    mistral = MistralConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"^method: .*'mistral' models cannot have"):
        config.check_against(mistral)


def test_answer_scores_and_mc(tiny_llama, tiny_tokenizer) -> None:
    record = QARecord(question="the capital of france is ?", true="paris", false=["rome", "a"])
    assert record.text("paris") == "Q: the capital of france is ?\nA: paris"
    items = [(record.prompt(), a) for a in ("paris", "rome", "a", "a big old city")]
    scores = answer_logprobs(tiny_llama, tiny_tokenizer, items, batch_size=2)
    for (prompt, answer), score in zip(items, scores.tolist(), strict=True):
        context = tiny_tokenizer(prompt).input_ids
        answer_ids = tiny_tokenizer(" " + answer, add_special_tokens=False).input_ids
        with torch.no_grad():
            out = tiny_llama(torch.tensor([context + answer_ids])).logits[0].log_softmax(-1)
        expected = sum(float(out[len(context) - 1 + j, t]) for j, t in enumerate(answer_ids))
        assert score == pytest.approx(expected, abs=1e-4)
    true_wins = bool(scores[0] > scores[1:3].max())  # paris against rome and a
    other = QARecord(question="the capital of france is ?", true=["rome", "a"], false="paris")
    assert mc_correct(tiny_llama, tiny_tokenizer, [record, other]) == [true_wins, not true_wins]
    assert mc_accuracy(tiny_llama, tiny_tokenizer, [record, other]) == 0.5


def test_probes_pick_the_planted_head() -> None:
    generator = torch.Generator().manual_seed(0)
    n, s, d, planted = 240, 12, 8, 7
    labels = (torch.arange(n) % 2).long()
    x = torch.randn(n, s, d, generator=generator)
    axis = torch.randn(d, generator=generator)
    axis /= axis.norm()
    x[:, planted] += 4.0 * (labels.float() - 0.5)[:, None] * axis  # separable along axis
    fit, held = torch.arange(0, 160), torch.arange(160, n)

    probes = fit_probes(x[fit], labels[fit], x[held], labels[held])

    assert rank_heads(probes)[0] == planted
    assert probes.accuracy[planted] > 0.95
    others = torch.cat([probes.accuracy[:planted], probes.accuracy[planted + 1 :]])
    assert float(others.max()) < 0.75
    assert torch.nn.functional.cosine_similarity(probes.weight[planted], axis, dim=0) > 0.9
    direction = mass_mean_directions(x[fit], labels[fit])
    assert torch.nn.functional.cosine_similarity(direction[planted], axis, dim=0) > 0.95
    shifts = head_shifts(x[fit], direction, alpha=3.0)
    unit = direction[planted] / direction[planted].norm()
    sigma = (x[fit][:, planted] @ unit).std()
    torch.testing.assert_close(shifts[planted], 3.0 * sigma * unit)


def test_probes_refuse_one_label() -> None:
    x = torch.randn(6, 2, 3)
    with pytest.raises(ValueError, match="both labels"):
        fit_probes(x, torch.ones(6, dtype=torch.long), x, torch.ones(6, dtype=torch.long))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bake_equals_shift_at_the_projection_input(family: str, tiny_tokenizer) -> None:
    model = tiny_model(family, seed=1)
    adapter = get_adapter(model)
    generator = torch.Generator().manual_seed(2)
    shifts = {
        (0, 1): torch.randn(adapter.head_dim, generator=generator),
        (1, 0): torch.randn(adapter.head_dim, generator=generator),
        (1, 3): torch.randn(adapter.head_dim, generator=generator),
    }
    hooked = copy.deepcopy(model)
    hooked_adapter = get_adapter(hooked)

    def pre_hook(layer: int):
        def hook(_module, args):
            hidden = args[0].clone()  # (B, T, heads * head_dim)
            for (at, head), shift in shifts.items():
                if at == layer:
                    hidden[..., hooked_adapter.head_columns(head)] += shift
            return (hidden, *args[1:])

        return hook

    for layer in range(2):
        hooked_adapter.attn_out(layer).module.register_forward_pre_hook(pre_hook(layer))
    before = logits(model, tiny_tokenizer)

    changed, overrides = bake_head_shifts(model, shifts)

    torch.testing.assert_close(logits(model, tiny_tokenizer), logits(hooked, tiny_tokenizer))
    assert not torch.allclose(logits(model, tiny_tokenizer), before)
    if family == "llama":
        assert overrides == {"attention_bias": True}
        assert set(changed) == {
            f"model.layers.{layer}.self_attn.{p}_proj.bias" for layer in (0, 1) for p in "qkvo"
        }
        assert torch.count_nonzero(changed["model.layers.0.self_attn.q_proj.bias"]) == 0
    else:
        assert overrides == {}
        assert set(changed) == {f"transformer.h.{layer}.attn.c_proj.bias" for layer in (0, 1)}
    state = persistent_state_dict(model)
    assert all(torch.equal(tensor, state[name]) for name, tensor in changed.items())


def test_run_records_reloads_from_store_and_export(store, tiny_tokenizer, tmp_path: Path) -> None:
    base = tiny_model("llama", seed=3)
    version = store.import_model(base, tiny_tokenizer, reference="tiny")
    model = copy.deepcopy(base)
    method = get_method("iti")
    config = method.config_class(
        records=RECORDS, top_k=3, alpha=4.0, probe_holdout_fraction=0.34, seed=1,
    )  # fmt: skip
    events: list[dict] = []
    ctx = context(tmp_path)
    ctx.report = events.append

    result = method.run(model, tiny_tokenizer, config, ctx)

    m = result.metrics
    assert set(m) == config.metric_names()
    assert m["heads_shifted"] == 3.0
    assert (m["texts_fit"], m["texts_heldout"]) == (12.0, 6.0)  # 4 and 2 records of 3 answers
    _, held_indices = split_indices(len(RECORDS), 0.34, seed=1)
    held = [QARecord.model_validate(RECORDS[i]) for i in held_indices]
    assert len(held) == 2
    assert m["mc1_before"] == mc_accuracy(base, tiny_tokenizer, held)
    assert m["mc1_after"] == mc_accuracy(model, tiny_tokenizer, held)
    table = json.loads(result.artifacts["iti_heads.json"])
    accuracy = torch.tensor(table["accuracy"])  # (layers, heads)
    chosen = [parse_head(entry["head"]) for entry in table["chosen"]]
    assert len(chosen) == 3 and m["probe_accuracy_best"] == pytest.approx(float(accuracy.max()))
    assert m["probe_accuracy_mean"] == pytest.approx(
        sum(float(accuracy[layer, head]) for layer, head in chosen) / 3, abs=1e-4
    )
    assert min(float(accuracy[h]) for h in chosen) >= sorted(accuracy.flatten().tolist())[-3]
    assert any(e.get("message") == "head activations" for e in events)
    assert result.config_overrides == {"attention_bias": True}

    child = store.commit(
        version.id,
        result.changed,
        operations=[config.model_dump()],
        config_overrides=result.config_overrides,
    )
    stored = load(child.id, store=store).model
    torch.testing.assert_close(logits(stored, tiny_tokenizer), logits(model, tiny_tokenizer))
    folder = store.export(child.id, tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert exported.config.attention_bias is True
    torch.testing.assert_close(logits(exported, tiny_tokenizer), logits(model, tiny_tokenizer))
    assert not torch.allclose(logits(exported, tiny_tokenizer), logits(base, tiny_tokenizer))


def test_run_gpt2_pairs_file_probe_direction(tiny_gpt2, tiny_tokenizer, tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    method = get_method("iti")
    config = method.config_class(
        pairs_file="pairs.jsonl", top_k=2, layers=[1], direction="probe", token="mean",
        evaluate_perplexity=False,
    )  # fmt: skip
    before = {k: v.clone() for k, v in persistent_state_dict(tiny_gpt2).items()}

    result = method.run(tiny_gpt2, tiny_tokenizer, config, context(tmp_path, (root,)))

    assert set(result.metrics) == config.metric_names()
    assert (result.metrics["texts_fit"], result.metrics["texts_heldout"]) == (10.0, 2.0)
    table = json.loads(result.artifacts["iti_heads.json"])
    assert table["layers"] == [1] and all(e["head"].startswith("1.") for e in table["chosen"])
    after = persistent_state_dict(tiny_gpt2)
    assert set(result.changed) == {"transformer.h.1.attn.c_proj.bias"}
    assert {k for k in before if not torch.equal(before[k], after[k])} == set(result.changed)
    assert result.config_overrides == {}

    with pytest.raises(ValueError, match=r"^pairs_file:"):
        method.run(tiny_gpt2, tiny_tokenizer, config, context(tmp_path, (tmp_path / "x",)))


def test_run_refuses_a_family_without_attention_output_bias(tiny_tokenizer, tmp_path) -> None:
    mistral = tiny_model("mistral")
    config = get_method("iti").config_class(records=RECORDS, evaluate_perplexity=False, top_k=2)
    with pytest.raises(ValueError, match="'mistral' models cannot have"):
        config.check_against(mistral.config)
