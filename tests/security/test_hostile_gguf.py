"""Hostile GGUF files under a model root (issue 29): SubmitJob refuses a file whose header or
metadata declares more than it holds, or more than the bounds, with INVALID_ARGUMENT naming the
reference and the problem, before transformers' readers build anything for it (a 46 MB file
cost the server 9 GB and two minutes); a malformed file is INVALID_ARGUMENT too, not INTERNAL;
a GGUF whose metadata lacks its architecture's shape keys (a 69-byte file that transformers
completed with Llama-7B's sizes, and the worker was OOM-killed building) or whose tensors do not
hold the model its metadata describes is INVALID_ARGUMENT too; a valid GGUF is still
admitted."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from gguf_files import (
    STRING,
    UINT8,
    block_gguf_readers,
    kv_array_header,
    kv_string,
    raw_gguf,
    tiny_llama_gguf,
)
from service_under_test import Running, running_service

from modelsurgery.client import InvalidArgument

HOSTILE = {
    "tensors.gguf": ({"tensors": 1_500_000}, "its header declares 1,500,000 tensors"),
    "array.gguf": (
        {"kvs": 2, "body": kv_string("a", "b") + kv_array_header("x", UINT8, 12_000_000)},
        "'x' is an array of 12,000,000 items",
    ),
    # transformers' reader raised struct.error on this one: INTERNAL.
    # 69 bytes naming the llama architecture: admitted, then a float32 Llama-7B in the worker.
    "claims.gguf": ({}, "its metadata lacks llama.block_count, llama.embedding_length"),
    "truncated.gguf": (
        {"kvs": 1, "body": kv_array_header("t", STRING, 2) + struct.pack("<QQ", 1 << 40, 0)},
        "it ends inside metadata 't'",
    ),
}


@pytest.fixture
def server(tmp_path: Path, tiny_llama, tiny_tokenizer) -> Iterator[Running]:
    with running_service(tmp_path / "home", tiny_llama, tiny_tokenizer) as running:
        yield running


def spec(base: Path) -> dict[str, object]:
    return {"base": str(base), "operations": [{"method": "mask_heads", "heads": ["0.1"]}]}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_submit_refuses_a_hostile_gguf_before_reading_it(
    server: Running, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    fields, expected = HOSTILE[name]
    path = raw_gguf(server.model.parent / name, **fields)
    block_gguf_readers(monkeypatch)
    with server.client() as client, pytest.raises(InvalidArgument) as raised:
        client.submit(spec(path))
    message = raised.value.message
    assert message.startswith(f"model reference {str(path)!r} is not a GGUF file"), message
    assert expected in message, message


def test_a_malformed_gguf_is_invalid_without_server_paths(server: Running, tmp_path: Path) -> None:
    path = raw_gguf(server.model.parent / "odd.gguf", kvs=1, body=kv_string("general.name", "x"))
    with server.client() as client, pytest.raises(InvalidArgument) as raised:
        client.submit(spec(path))
    problem = raised.value.message.partition(" reads: ")[2]
    assert problem.startswith("it does not parse (ValueError: odd.gguf has no"), problem
    assert str(tmp_path) not in problem


def test_a_gguf_whose_tensors_do_not_hold_its_model_is_refused(server: Running) -> None:
    claims = {"embedding_length": 4096, "feed_forward_length": 11008, "vocab_size": 32000}
    path = tiny_llama_gguf(server.model.parent / "widths.gguf", claims=claims)
    with server.client() as client, pytest.raises(InvalidArgument) as raised:
        client.submit(spec(path))
    message = raised.value.message
    assert message.startswith(f"model reference {str(path)!r} is not a GGUF file"), message
    assert "its tensors hold 1,384 parameters; the model its metadata describes" in message


def test_a_valid_gguf_is_admitted(server: Running) -> None:
    path = tiny_llama_gguf(server.model.parent / "tiny.gguf")
    with server.client() as client:
        assert client.submit(spec(path)).id
