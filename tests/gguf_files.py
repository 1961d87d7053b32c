"""GGUF files for tests: hostile ones written byte by byte (a header that lies about its counts,
an array longer than the file) and a tiny valid Llama one written with the ``gguf`` package."""

from __future__ import annotations

import struct
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


def tiny_llama_gguf(path: Path) -> Path:
    """A valid two-layer Llama GGUF (float32 weights, a 4-token vocabulary) of a few KB."""
    import gguf

    hidden, layers, heads, ffn, vocab = 8, 2, 2, 16, 4
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(32)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", "a"])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([2, 3, 3, 1])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> None:
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))

    weight("token_embd.weight", vocab, hidden)
    weight("output_norm.weight", hidden)
    weight("output.weight", vocab, hidden)
    for i in range(layers):
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            weight(f"blk.{i}.{part}.weight", hidden, hidden)
        weight(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        weight(f"blk.{i}.ffn_up.weight", ffn, hidden)
        weight(f"blk.{i}.ffn_down.weight", hidden, ffn)
        weight(f"blk.{i}.attn_norm.weight", hidden)
        weight(f"blk.{i}.ffn_norm.weight", hidden)
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
