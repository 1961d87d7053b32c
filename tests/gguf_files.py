"""GGUF files for tests: hostile ones written byte by byte (a header that lies about its counts,
an array longer than the file) and a tiny valid Llama one written with the ``gguf`` package,
whose metadata can claim sizes its tensors do not have."""

from __future__ import annotations

import struct
from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np
import pytest

MAGIC = b"GGUF"
UINT8, UINT32, STRING, ARRAY = 0, 4, 8, 9


def gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def kv_uint32(key: str, value: int) -> bytes:
    return gguf_string(key) + struct.pack("<II", UINT32, value)


def kv_string(key: str, value: str) -> bytes:
    return gguf_string(key) + struct.pack("<I", STRING) + gguf_string(value)


def kv_array_header(key: str, item_type: int, length: int) -> bytes:
    """An array's key, type, item type and declared length, without its items."""
    return gguf_string(key) + struct.pack("<IIQ", ARRAY, item_type, length)


def tensor_info(name: str, dims: tuple[int, ...], offset: int = 0) -> bytes:
    shape = struct.pack(f"<{len(dims)}Q", *dims)
    return gguf_string(name) + struct.pack("<I", len(dims)) + shape + struct.pack("<IQ", 0, offset)


def raw_gguf(
    path: Path,
    *,
    tensors: int = 0,
    kvs: int | None = None,
    body: bytes = b"",
    version: int = 3,
) -> Path:
    """A file of a GGUF header declaring ``tensors`` tensors and ``kvs`` metadata entries
    (default: one), followed by ``body`` as it is (the header may lie about what follows)."""
    if kvs is None:
        kvs = 1
        body = kv_string("general.architecture", "llama") + body
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(MAGIC + struct.pack("<IQQ", version, tensors, kvs) + body)
    return path


TINY_SHAPE = {
    "block_count": 2,
    "context_length": 32,
    "embedding_length": 8,
    "feed_forward_length": 16,
    "attention.head_count": 2,
    "attention.head_count_kv": 2,
    "vocab_size": 4,
}
"""The tiny Llama's shape metadata (each key is ``llama.<key>``): its tensors have these sizes."""


def tiny_llama_gguf(
    path: Path,
    *,
    claims: Mapping[str, int | None] | None = None,
    tied: bool = False,
    leave_out: Collection[str] = (),
    extra: Mapping[str, int] | None = None,
) -> Path:
    """A valid two-layer Llama GGUF (float32 weights, a 4-token vocabulary) of a few KB.

    A hostile variant's metadata can claim other sizes than its tensors have: ``claims``
    overrides ``TINY_SHAPE`` (None leaves the key out); ``tied`` leaves out ``output.weight``,
    ``leave_out`` the tensors whose names start with one of its prefixes, and ``extra`` adds
    one-dimensional tensors of the given lengths."""
    import gguf

    hidden, layers, ffn, vocab = 8, 2, 16, 4
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in {**TINY_SHAPE, **(claims or {})}.items():
        if value is not None:
            writer.add_uint32(f"llama.{key}", value)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", "a"])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([2, 3, 3, 1])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> None:
        if not name.startswith(tuple(leave_out)):
            writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))

    weight("token_embd.weight", vocab, hidden)
    weight("output_norm.weight", hidden)
    if not tied:
        weight("output.weight", vocab, hidden)
    for i in range(layers):
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            weight(f"blk.{i}.{part}.weight", hidden, hidden)
        weight(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        weight(f"blk.{i}.ffn_up.weight", ffn, hidden)
        weight(f"blk.{i}.ffn_down.weight", hidden, ffn)
        weight(f"blk.{i}.attn_norm.weight", hidden)
        weight(f"blk.{i}.ffn_norm.weight", hidden)
    for name, length in (extra or {}).items():
        weight(name, length)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def block_gguf_readers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if transformers' GGUF readers open a file: its own (which maps the file with
    ``_mapped``) or the ``gguf`` package's, which it uses for some architectures."""
    import gguf
    import transformers.integrations.gguf.reader as reader_module

    def reader(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a GGUF reader was reached")

    monkeypatch.setattr(reader_module, "_mapped", reader)
    monkeypatch.setattr(gguf, "GGUFReader", reader)
