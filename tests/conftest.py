"""Shared fixtures: tiny seeded models and tokenizer (no hub), and a store in a temp folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from junitparser import JUnitXml, TestSuite
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CONFIG_MAPPING,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from modelsurgery.checkpoints import CheckpointStore

# Every e2e server gets a scratch MODELSURGERY_HOME; the dequantised SmolLM2 is shared between
# them (and test runs) instead of being rebuilt in each home.
os.environ.setdefault("MODELSURGERY_CACHE", str(Path.home() / ".cache" / "modelsurgery-tests"))

TINY_VOCAB_SIZE = 128
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
_VOCAB_TEXT = (
    "the a an of in on to is was and or not it he she they we you i my his her their "
    "paris london rome berlin madrid tokyo france england italy germany spain japan "
    "capital city country river language french english italian german spanish japanese "
    "eiffel tower colosseum speaks lives born plays football piano doctor nurse engineer "
    "good bad big small old new red blue green one two three . , ? !"
)
_WORDS = _VOCAB_TEXT.split()


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a fixed vocabulary (ids below TINY_VOCAB_SIZE)."""
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *_WORDS])}
    assert len(vocab) <= TINY_VOCAB_SIZE
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


# Each family's small dims, by Hugging Face model_type; all use the tiny tokenizer's vocabulary
# and special token ids.
_DIMS = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
    "vocab_size": TINY_VOCAB_SIZE,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
}
_MLP = {**_DIMS, "intermediate_size": 128}
_GQA = {**_MLP, "num_key_value_heads": 2}
TINY_FAMILIES: dict[str, dict[str, object]] = {
    "llama": _GQA,
    "mistral": _GQA,  # no bias on either residual write (o_proj, down_proj)
    "qwen2": _GQA,
    "qwen3": {**_GQA, "head_dim": 16},
    "gemma": {**_GQA, "head_dim": 16},
    "gemma2": {**_GQA, "head_dim": 16},
    "gemma3_text": {**_GQA, "head_dim": 16},
    "phi": _MLP,
    "gpt_neox": _MLP,
    "opt": {**_DIMS, "ffn_dim": 128, "word_embed_proj_dim": 64},
    "gpt2": _DIMS,  # ties lm_head to the token embedding
    "gptj": {**_DIMS, "rotary_dim": 8},
}


def tiny_config(family: str, **overrides: object) -> PretrainedConfig:
    """The config of ``tiny_model(family)``: the family's small dims, then ``overrides`` (under
    either name where the family has two: ``hidden_size`` or GPT-2's ``n_embd``)."""
    config_class = CONFIG_MAPPING[family]
    fields = {**TINY_FAMILIES[family], **overrides}
    return config_class(**{config_class.attribute_map.get(k, k): v for k, v in fields.items()})


def tiny_model(family: str, seed: int = 0, **overrides: object) -> PreTrainedModel:
    """A tiny random causal LM of ``family`` (a model_type), seeded; ``overrides`` are config
    fields, under the names the family's config takes."""
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def greedy_text(model: torch.nn.Module, tokenizer, prompt: str, new_tokens: int) -> str:
    """Greedy continuation of ``prompt``, as the server's Generate decodes by default."""
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **ids,
            max_new_tokens=new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)


def read_junit(path: Path) -> TestSuite:
    """The one suite of a JUnit XML file, read the way CI systems read it (junitparser)."""
    (suite,) = JUnitXml.fromfile(str(path))
    return suite


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_llama() -> PreTrainedModel:
    return tiny_model("llama")


@pytest.fixture
def tiny_gpt2() -> PreTrainedModel:
    return tiny_model("gpt2")


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "store")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama and its tokenizer saved as a Hugging Face folder, once per test module."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", seed=3).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder
