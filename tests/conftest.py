"""Shared fixtures: tiny seeded models and tokenizer (no hub), and a store in a temp folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from junitparser import JUnitXml, TestSuite
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
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


def build_tiny_llama(seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=TINY_VOCAB_SIZE,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


def build_tiny_mistral(seed: int = 0) -> MistralForCausalLM:
    """A family with no bias on either residual write (o_proj, down_proj): hook-only steering."""
    torch.manual_seed(seed)
    config = MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=TINY_VOCAB_SIZE,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    return MistralForCausalLM(config).eval()


def build_tiny_gpt2(seed: int = 0, **overrides: object) -> GPT2LMHeadModel:
    """GPT-2 ties lm_head to the token embedding (tie_word_embeddings defaults to True)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=128,
        vocab_size=TINY_VOCAB_SIZE,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        **overrides,
    )
    return GPT2LMHeadModel(config).eval()


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
def tiny_llama() -> LlamaForCausalLM:
    return build_tiny_llama()


@pytest.fixture
def tiny_gpt2() -> GPT2LMHeadModel:
    return build_tiny_gpt2()


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "store")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama and its tokenizer saved as a Hugging Face folder, once per test module."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(seed=3).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder
