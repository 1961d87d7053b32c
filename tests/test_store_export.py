"""Export: the folder loads with from_pretrained as is and reproduces the stored model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from modelsurgery.models.digest import model_digest

PROMPT = "the capital of france is paris"


def logits(model, tokenizer) -> torch.Tensor:
    ids = torch.tensor([tokenizer(PROMPT).input_ids])
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_export_reloads_with_identical_logits(request, store, tiny_tokenizer, tmp_path, family):
    model = request.getfixturevalue(family)
    base = store.import_model(model, tiny_tokenizer, reference=family)
    folder = store.export(base.id, tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer(PROMPT).input_ids == tiny_tokenizer(PROMPT).input_ids
    assert torch.equal(logits(loaded, tokenizer), logits(model, tiny_tokenizer))
    assert model_digest(loaded) == store.digest(base.id)
    record = json.loads((folder / "modelsurgery.json").read_text())
    assert record["manifest"]["id"] == base.id and record["lineage"] == [base.id]


def test_gpt2_tied_lm_head_is_written_once_and_retied(store, tiny_gpt2, tiny_tokenizer, tmp_path):
    base = store.import_model(tiny_gpt2, tiny_tokenizer, reference="gpt2")
    wte = "transformer.wte.weight"
    edited_embedding = tiny_gpt2.get_parameter(wte).detach() * 2
    child = store.commit(base.id, {wte: edited_embedding}, operations=[{"method": "test"}])
    folder = store.export(child.id, tmp_path / "export")
    with safe_open(folder / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert wte in names and "lm_head.weight" not in names
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, edited_embedding)


def test_export_of_edited_and_pruned_version(store, tiny_llama, tiny_tokenizer, tmp_path):
    base = store.import_model(tiny_llama, tiny_tokenizer, reference="llama")
    keep = torch.arange(96)
    changed = {}
    for layer in range(2):
        mlp = tiny_llama.model.layers[layer].mlp
        prefix = f"model.layers.{layer}.mlp."
        changed[prefix + "gate_proj.weight"] = mlp.gate_proj.weight.detach()[keep]
        changed[prefix + "up_proj.weight"] = mlp.up_proj.weight.detach()[keep]
        changed[prefix + "down_proj.weight"] = mlp.down_proj.weight.detach()[:, keep]
    pruned = store.commit(
        base.id,
        changed,
        operations=[{"method": "prune"}],
        config_overrides={"intermediate_size": 96},
        artifacts={"pruning/report.json": b'{"kept": 96}'},
    )
    folder = store.export(pruned.id, tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.config.intermediate_size == 96
    state = store.state_dict(pruned.id)
    assert all(torch.equal(p, state[n]) for n, p in loaded.named_parameters())
    assert (folder / "pruning" / "report.json").read_bytes() == b'{"kept": 96}'
    record = json.loads((folder / "modelsurgery.json").read_text())
    assert record["lineage"] == [pruned.id, base.id]


def test_sharded_export_and_progress(store, tiny_llama, tiny_tokenizer, tmp_path):
    base = store.import_model(tiny_llama, tiny_tokenizer, reference="llama")
    calls = []
    folder = store.export(
        base.id,
        tmp_path / "export",
        progress=lambda d, t: calls.append((d, t)),
        max_shard_size=40_000,
    )
    total = len(base.tensors)
    assert calls == [(i, total) for i in range(1, total + 1)]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (folder / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert torch.equal(logits(loaded, tiny_tokenizer), logits(tiny_llama, tiny_tokenizer))
    store.export(base.id, folder)
    assert (folder / "model.safetensors").exists()
    assert not list(folder.glob("model-*-of-*.safetensors"))
    assert not (folder / "model.safetensors.index.json").exists()
