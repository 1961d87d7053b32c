"""Sparse (bitmask) storage of pruned tensors: lossless, smaller, digest unchanged, dense
export."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from modelsurgery.checkpoints.codecs import DENSE, choose_encoding, get_codec
from modelsurgery.checkpoints.sparse import SPARSE_BITMASK
from modelsurgery.models import load
from modelsurgery.models.digest import model_digest, tensor_blob_bytes, tensor_sha256

DOWN = "model.layers.0.mlp.down_proj.weight"


def pruned(shape: tuple[int, ...], sparsity: float, seed: int = 0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(*shape, generator=generator).to(dtype)
    drop = torch.rand(*shape, generator=generator) < sparsity
    return weight.masked_fill(drop, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitmask_round_trip_is_bit_exact(dtype):
    tensor = pruned((96, 80), 0.6, dtype=dtype)
    tensor[0, :4] = torch.tensor([-0.0, float("nan"), float("inf"), 0.0], dtype=dtype)
    codec = get_codec(SPARSE_BITMASK)
    decoded = codec.decode(codec.encode(tensor))
    assert decoded.dtype == dtype and decoded.shape == tensor.shape
    assert tensor_blob_bytes(decoded) == tensor_blob_bytes(tensor)


def test_encoding_is_chosen_by_the_bytes_it_saves():
    assert choose_encoding(pruned((64, 128), 0.5)) == SPARSE_BITMASK
    assert choose_encoding(pruned((64, 128), 0.1)) == DENSE
    assert choose_encoding(pruned((8, 8), 0.9)) == DENSE
    assert choose_encoding(torch.zeros(64, 128, dtype=torch.int64)) == DENSE


def test_pruned_version_is_stored_compactly_and_exports_dense(
    store, tiny_llama, tiny_tokenizer, tmp_path
):
    base = store.import_model(tiny_llama, tiny_tokenizer, reference="tiny-llama")
    weight = pruned((64, 128), 0.5, seed=3)
    child = store.commit(base.id, {DOWN: weight}, operations=[{"method": "prune"}])
    entry = child.tensors[DOWN]
    assert entry.encoding == SPARSE_BITMASK
    assert entry.digest == tensor_sha256(weight) != entry.blob
    blob_bytes = store.layout.tensor_blob(entry.blob).stat().st_size
    assert blob_bytes < 0.6 * len(tensor_blob_bytes(weight))
    assert torch.equal(store.tensor(child.id, DOWN), weight)

    loaded = load(child.id, store=store)
    assert loaded.digest == store.digest(child.id) == model_digest(loaded.model)
    assert store.verify().ok

    folder = store.export(child.id, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(reloaded.get_parameter(DOWN), weight)
