"""Shared test kit: tiny seeded models (``tiny_model``) and tokenizers (no hub), a store, a job
environment for ``execute_job`` (``job_env``, ``run_job``) and a default server."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from junitparser import JUnitXml, TestSuite
from tokenizers import Tokenizer, models
from tokenizers.pre_tokenizers import PreTokenizer, Whitespace
from transformers import (
    CONFIG_MAPPING,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.server.process import ServerProcess, start_server

if TYPE_CHECKING:
    from modelsurgery.server.outcome import JobOutcome

# Every e2e server gets a scratch MODELSURGERY_HOME; the dequantised SmolLM2 is shared between
# them (and test runs) instead of being rebuilt in each home.
os.environ.setdefault("MODELSURGERY_CACHE", str(Path.home() / ".cache" / "modelsurgery-tests"))

TINY_VOCAB_SIZE = 128
SPECIAL_TOKENS = {
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
}
_VOCAB_TEXT = (
    "the a an of in on to is was and or not it he she they we you i my his her their "
    "paris london rome berlin madrid tokyo france england italy germany spain japan "
    "capital city country river language french english italian german spanish japanese "
    "eiffel tower colosseum speaks lives born plays football piano doctor nurse engineer "
    "good bad big small old new red blue green one two three . , ? !"
)
_WORDS = _VOCAB_TEXT.split()


def bounded(call: Callable[[], Any], seconds: float, what: str) -> Any:
    """``call()`` in a thread joined with a bound, its exception re-raised here: a regression
    that hangs (a deadlock, an endless render) fails the test instead of hanging the suite."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = call()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{what} did not return within {seconds:g} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


def word_level_tokenizer(
    words: list[str], pre_tokenizer: PreTokenizer, **special_tokens: str
) -> PreTrainedTokenizerFast:
    """A fast tokenizer (no hub) giving each piece ``pre_tokenizer`` cuts its index in ``words``;
    ``special_tokens`` (``unk_token`` at least) are among the words."""
    vocab = {word: i for i, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=special_tokens["unk_token"]))
    backend.pre_tokenizer = pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a fixed vocabulary (ids below TINY_VOCAB_SIZE)."""
    assert len(SPECIAL_TOKENS) + len(_WORDS) <= TINY_VOCAB_SIZE
    return word_level_tokenizer([*SPECIAL_TOKENS.values(), *_WORDS], Whitespace(), **SPECIAL_TOKENS)


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


def build_editable(family: str, seed: int = 0, layers: int = 4) -> PreTrainedModel:
    """A 4-layer model with larger initial weights than HF's default 0.02, so an edit at an
    early layer can move the next-token distribution measurably."""
    positions = 128 if family == "gpt2" else 2048
    return tiny_model(
        family,
        seed=seed,
        num_hidden_layers=layers,
        initializer_range=0.1,
        max_position_embeddings=positions,
        pad_token_id=None,
    )


_CORPUS_TEXT = (
    "the capital of france is paris . the capital of italy is rome . he speaks french and she "
    "speaks english . they live in london and we live in berlin . my old red city is big ."
)
_CORPUS_WORDS = _CORPUS_TEXT.split()


def write_corpus(root: Path, words: int = 6000, seed: int = 0) -> Path:
    """A small WikiText-2 stand-in made of tiny-vocabulary words, so keys vary."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(_CORPUS_WORDS), (words,), generator=generator).tolist()
    path = root / "wikitext-2" / "valid.tokens"
    path.parent.mkdir(parents=True)
    path.write_text(" ".join(_CORPUS_WORDS[i] for i in picks), encoding="utf-8")
    return path


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
def one_thread() -> Iterator[None]:
    """One torch thread for the test: on tiny matrices on a shared 2-core machine, extra
    threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "store")


@pytest.fixture
def job_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What ``run_job`` needs: a tiny editable Llama saved as a folder, WikiText-2 stand-ins
    under DATA_ENV, and the store, model cache and worker settings ``execute_job`` takes."""
    from modelsurgery.editing.data import DATA_ENV
    from modelsurgery.server.executor import WorkerSettings
    from modelsurgery.server.model_cache import ModelCache

    data = tmp_path / "data"
    corpus = write_corpus(data)
    (data / "wikitext-2" / "wiki.test.raw").write_text(corpus.read_text())
    monkeypatch.setenv(DATA_ENV, str(data))
    folder = tmp_path / "tiny"
    build_editable("llama").save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return {
        "folder": folder,
        "store": CheckpointStore(tmp_path / "store"),
        "cache": ModelCache(1 << 30),
        "settings": WorkerSettings(store_root=tmp_path / "store", cache_dir=tmp_path / "cache"),
    }


def run_job(
    env: dict[str, Any],
    operations: list[dict[str, Any]],
    base: str | None = None,
    emit: Callable[[dict[str, Any]], None] = lambda event: None,
    **spec: Any,
) -> JobOutcome:
    """``execute_job`` on ``job_env``: ``operations`` on ``base`` (the env's folder unless
    given), ``spec`` the job's other fields (``gates``)."""
    from modelsurgery.server.executor import execute_job

    return execute_job(
        {"base": base or str(env["folder"]), "operations": operations, **spec},
        store=env["store"],
        cache=env["cache"],
        settings=env["settings"],
        emit=emit,
        is_cancelled=lambda: False,
    )


@pytest.fixture(scope="module", autouse=True)
def module_scratch_removed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Folders a module made with ``mktemp`` go when the module ends, unless one of its tests
    failed: a server home holds SmolLM2 versions (0.5-3 GB), and a suite that kept them all used
    12 GB of disk per run. (Each test's own ``tmp_path`` goes when it passes; see pyproject.)"""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failures_before = request.session.testsfailed
    yield
    if request.session.testsfailed == failures_before:
        for entry in set(base.iterdir()) - before:
            shutil.rmtree(entry, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with the default settings in a scratch home, one per module that asks for it
    (modules needing other settings define their own); stopped gracefully at the end."""
    process = start_server(tmp_path_factory.mktemp("home"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama and its tokenizer saved as a Hugging Face folder, once per test module."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", seed=3).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder
