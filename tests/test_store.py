"""Checkpoint store: versions, delta storage, lineage, aliases, diff, revert, verify, gc."""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_tokenizer, tiny_model

from modelsurgery.checkpoints import (
    AliasConflictError,
    CheckpointStore,
    InvalidAliasError,
    VersionNotFoundError,
    default_root,
)
from modelsurgery.checkpoints import store as store_module
from modelsurgery.models.digest import model_digest, persistent_state_dict, tensor_blob_bytes

DOWN = "model.layers.0.mlp.down_proj.weight"
UP = "model.layers.1.mlp.up_proj.weight"
NORM = "model.norm.weight"


def store_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and "locks" not in p.parts)


def store_files(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def base(store, tiny_llama, tiny_tokenizer):
    return store.import_model(tiny_llama, tiny_tokenizer, reference="tiny-llama")


def test_import_stores_every_tensor_config_and_tokenizer(store, tiny_llama, base):
    expected = persistent_state_dict(tiny_llama)
    assert base.parent is None
    assert base.root.reference == "tiny-llama"
    assert base.root.digest == model_digest(tiny_llama) == store.digest(base.id)
    assert set(base.tensors) == set(expected)
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(base.files)
    state = store.state_dict(base.id)
    assert all(torch.equal(state[name], tensor) for name, tensor in expected.items())
    config = store.hf_config(base.id)
    assert config["hidden_size"] == 64
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_import_is_idempotent_and_writes_nothing_new(store, tiny_tokenizer, base):
    before = store_files(store.root)
    again = store.import_model(tiny_model("llama"), tiny_tokenizer, reference="again")
    assert again.id == base.id
    assert store_files(store.root) == before
    other = store.import_model(tiny_model("llama", seed=1), tiny_tokenizer, reference="other")
    assert other.id != base.id


def test_import_drops_gguf_quantization_config(store, tiny_llama, tiny_tokenizer):
    tiny_llama.config.quantization_config = {"quant_method": "gguf", "gguf_file": "m.gguf"}
    manifest = store.import_model(tiny_llama, tiny_tokenizer, reference="gguf")
    config = json.loads(store.read_file(manifest.id, "config.json"))
    assert "quantization_config" not in config
    assert "_name_or_path" not in config and "transformers_version" not in config


def test_commit_stores_only_changed_tensors(store, tiny_llama, base):
    new_down = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    before = store_bytes(store.root)
    child = store.commit(base.id, {DOWN: new_down}, operations=[{"method": "rome", "layer": 0}])
    added = store_bytes(store.root) - before
    manifest_bytes = store.layout.manifest(child.id).stat().st_size
    assert added <= len(tensor_blob_bytes(new_down)) + manifest_bytes
    assert list(child.tensors) == [DOWN]
    assert child.parent == base.id and child.root == base.root
    state = store.state_dict(child.id)
    assert torch.equal(state[DOWN], new_down)
    assert torch.equal(state[UP], tiny_llama.get_parameter(UP))
    assert torch.equal(store.tensor(base.id, DOWN), tiny_llama.get_parameter(DOWN))


def test_commit_is_content_addressed(store, tiny_llama, base):
    ops = [{"method": "test"}]
    change = {DOWN: torch.zeros(64, 128)}
    first = store.commit(base.id, change, operations=ops, metrics={"loss": 1.0})
    second = store.commit(base.id, {DOWN: torch.zeros(64, 128)}, operations=ops)
    assert first.id == second.id and second.metrics == {"loss": 1.0}
    assert first.id != store.commit(base.id, change, operations=[{"method": "other"}]).id
    unchanged = {UP: tiny_llama.get_parameter(UP).detach().clone()}
    noop = store.commit(base.id, unchanged, operations=ops)
    assert noop.tensors == {}


def test_commit_shape_change_removed_and_config_overrides(store, base):
    narrow = torch.ones(64, 96)
    child = store.commit(
        base.id,
        {DOWN: narrow},
        operations=[{"method": "prune"}],
        config_overrides={"intermediate_size": 96},
        removed=[UP],
    )
    grandchild = store.commit(child.id, {}, operations=[], config_overrides={"rms_norm_eps": 0.5})
    state = store.state_dict(grandchild.id)
    assert state[DOWN].shape == (64, 96)
    assert UP not in state
    config = store.hf_config(grandchild.id)
    assert config["intermediate_size"] == 96 and config["rms_norm_eps"] == 0.5
    assert store.hf_config(base.id)["intermediate_size"] == 128
    with pytest.raises(KeyError):
        store.tensor(child.id, UP)


def test_commit_rejects_bad_removals_and_artifact_names(store, base):
    with pytest.raises(ValueError, match="no such tensor"):
        store.commit(base.id, {}, operations=[], removed=["nope.weight"])
    with pytest.raises(ValueError, match="both removed and written"):
        store.commit(base.id, {DOWN: torch.zeros(1)}, operations=[], removed=[DOWN])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "../x.bin", DOWN):
        with pytest.raises(ValueError):
            store.commit(base.id, {}, operations=[], artifacts={name: b"x"})
    with pytest.raises(ValueError, match="JSON"):
        store.commit(base.id, {}, operations=[{"bad": object()}])


def test_artifacts_are_inherited_and_removable(store, base):
    with_reft = store.commit(base.id, {}, operations=[], artifacts={"reft/iv.bin": b"R1"})
    edited = store.commit(with_reft.id, {NORM: torch.zeros(64)}, operations=[])
    assert store.read_file(edited.id, "reft/iv.bin") == b"R1"
    dropped = store.commit(edited.id, {}, operations=[], removed=["reft/iv.bin"])
    with pytest.raises(KeyError):
        store.read_file(dropped.id, "reft/iv.bin")


def test_refs_resolve_by_id_alias_and_unique_prefix(store, base):
    child = store.commit(base.id, {NORM: torch.zeros(64)}, operations=[])
    store.set_alias("prod", child.id)
    assert store.get("prod") == child
    assert store.resolve(child.id[:8]) == child.id
    assert store.get(base.id).id == base.id
    for missing in ("nope", "v0000000000000000000x", "v", child.id[:3]):
        with pytest.raises(VersionNotFoundError):
            store.get(missing)
    with pytest.raises(KeyError):
        store.resolve("unknown-alias")


def test_ambiguous_prefix_is_an_error(store, base, monkeypatch):
    monkeypatch.setattr(store_module, "MIN_PREFIX_LEN", 2)
    ids = [base.id]
    while len({i[:2] for i in ids}) == len(ids):
        ids.append(store.commit(base.id, {}, operations=[{"n": len(ids)}]).id)
    with pytest.raises(VersionNotFoundError, match="ambiguous"):
        store.resolve(ids[-1][:2])
    assert store.resolve(ids[-1][:12]) == ids[-1]


def test_lineage_and_list_versions_newest_first(store, base):
    a = store.commit(base.id, {NORM: torch.zeros(64)}, operations=[{"n": 1}])
    b = store.commit(a.id, {NORM: torch.ones(64)}, operations=[{"n": 2}])
    assert [m.id for m in store.lineage(b.id)] == [b.id, a.id, base.id]
    assert [m.id for m in store.list_versions()] == [b.id, a.id, base.id]
    reopened = CheckpointStore(store.root)
    assert [m.id for m in reopened.list_versions()] == [b.id, a.id, base.id]
    assert reopened.get(b.id) == b


def test_diff_reports_changes_with_relative_norm(store, tiny_llama, base):
    old = tiny_llama.get_parameter(DOWN).detach()
    new = old * 1.5
    child = store.commit(
        base.id,
        {DOWN: new, UP: torch.zeros(96, 64), "extra.bias": torch.ones(3)},
        operations=[],
        removed=[NORM],
    )
    changes = {c.name: c for c in store.diff(base.id, child.id)}
    assert set(changes) == {DOWN, UP, NORM, "extra.bias"}
    assert changes[DOWN].status == "changed"
    assert math.isclose(changes[DOWN].relative_norm, 0.5, rel_tol=1e-6)
    assert changes[UP].status == "reshaped" and changes[UP].relative_norm is None
    assert changes[NORM].status == "removed" and changes["extra.bias"].status == "added"
    assert store.diff(child.id, child.id) == []


def test_revert_restores_parent_tensors_config_and_artifacts(store, base):
    edited = store.commit(base.id, {NORM: torch.zeros(64)}, operations=[])
    pruned = store.commit(
        edited.id,
        {DOWN: torch.ones(64, 96), "new.weight": torch.ones(2)},
        operations=[{"method": "prune"}],
        config_overrides={"intermediate_size": 96, "pruned": True},
        artifacts={"scores.json": b"{}"},
        removed=[UP],
    )
    reverted = store.revert(pruned.id)
    assert reverted.parent == pruned.id
    assert reverted.operations[0]["method"] == "revert"
    assert store.digest(reverted.id) == store.digest(edited.id)
    assert store.tensor_entries(reverted.id) == store.tensor_entries(edited.id)
    config = store.hf_config(reverted.id)
    assert config["intermediate_size"] == 128 and config.get("pruned") is None
    with pytest.raises(KeyError):
        store.read_file(reverted.id, "scores.json")
    with pytest.raises(ValueError, match="base version"):
        store.revert(base.id)


def test_alias_compare_and_swap(store, base):
    child = store.commit(base.id, {NORM: torch.zeros(64)}, operations=[])
    store.set_alias("prod", base.id, expected=None)
    with pytest.raises(AliasConflictError):
        store.set_alias("prod", child.id, expected=None)
    with pytest.raises(AliasConflictError):
        store.set_alias("prod", child.id, expected=child.id)
    store.set_alias("prod", child.id, expected=base.id)
    store.set_alias("staging", "prod")
    assert store.list_aliases() == {"prod": child.id, "staging": child.id}
    with pytest.raises(AliasConflictError):
        store.delete_alias("prod", expected=base.id)
    store.delete_alias("prod", expected=child.id)
    assert store.get_alias("prod") is None
    store.set_alias("prod", base.id)
    assert store.get_alias("prod") == base.id
    with pytest.raises(InvalidAliasError):
        store.set_alias("-bad", base.id)
    with pytest.raises(VersionNotFoundError):
        store.set_alias("x", "v00000000000000000000")


def test_verify_reports_flipped_byte_missing_blob_and_bad_manifest(store, base):
    child = store.commit(base.id, {NORM: torch.zeros(64)}, operations=[])
    store.set_alias("prod", child.id)
    assert store.verify().ok
    blob = store.layout.tensor_blob(child.tensors[NORM].blob)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    report = store.verify()
    assert not report.ok
    assert any("corrupt blob" in p and child.tensors[NORM].blob in p for p in report.problems)
    blob.unlink()
    assert any("missing" in p and NORM in p for p in store.verify().problems)
    tampered = json.loads(store.layout.manifest(base.id).read_bytes())
    tampered["removed"] = [UP]
    store.layout.manifest(base.id).write_text(json.dumps(tampered))
    assert any("does not hash to its id" in p for p in store.verify().problems)


def test_failed_manifest_write_leaves_old_state(store, base, monkeypatch):
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst).parent == store.layout.versions:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        store.commit(base.id, {NORM: torch.zeros(64)}, operations=[])
    monkeypatch.undo()
    assert [m.id for m in store.list_versions()] == [base.id]
    assert list(store.layout.tmp.iterdir()) == []
    assert store.verify().ok


def test_gc_removes_only_orphan_temp_files(store):
    dead = store.layout.tmp / "999999999@nohost-elsewhere@x.tmp"
    dead.write_bytes(b"partial")
    os.utime(dead, (0, 0))
    live = store.layout.tmp / f"{os.getpid()}@{socket.gethostname()}@y.tmp"
    live.write_bytes(b"in progress")
    removed = store.gc()
    assert removed == [dead]
    assert live.exists()
    assert store.list_versions() == [] and store.verify().ok


def test_default_root_follows_modelsurgery_home(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELSURGERY_HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home" / "store"
    assert CheckpointStore().root == tmp_path / "home" / "store"
    monkeypatch.delenv("MODELSURGERY_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert default_root() == tmp_path / "user" / ".modelsurgery" / "store"


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(3, 5),
        torch.randn(4, 7).to(torch.bfloat16),
        torch.randn(2, 3, 2).half(),
        torch.tensor(2.5, dtype=torch.float64),
        torch.zeros(0, 4),
        torch.arange(9, dtype=torch.int64),
        torch.tensor([True, False, True]),
        torch.randn(6, 4).t(),
        torch.randn(5).to(torch.float8_e4m3fn),
    ],
    ids=["f32", "bf16", "f16", "f64-scalar", "empty", "i64", "bool", "transposed", "f8"],
)
def test_blob_encoding_streamed_from_the_tensor_is_safetensors_own(tensor: torch.Tensor) -> None:
    """Blobs are hashed and written from the tensor's memory (header + view, no whole copy):
    the bytes and address must stay exactly safetensors' ``save`` of the tensor."""
    from safetensors.torch import save

    from modelsurgery.models.digest import tensor_blob_parts, tensor_sha256

    expected = save({"tensor": tensor.contiguous()})
    header, view = tensor_blob_parts(tensor)
    assert header + bytes(view) == expected == tensor_blob_bytes(tensor)
    assert tensor_sha256(tensor) == hashlib.sha256(expected).hexdigest()


def test_a_dense_blob_is_written_from_its_parts(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "store")
    weight = torch.randn(16, 8)
    entry = store._blobs.put_tensor(weight)
    path = store.layout.tensor_blob(entry.blob)
    assert path.read_bytes() == tensor_blob_bytes(weight)
    assert torch.equal(store._blobs.tensor(entry), weight)


def test_a_builtin_reference_resolves_to_its_imported_root(tmp_path: Path) -> None:
    """Issue 31: the base a spec names (``smollm2-135m``) can be named again, locally too;
    other model references and unknown names are not versions."""
    store = CheckpointStore(tmp_path / "store")
    model, tokenizer = tiny_model("llama"), build_tiny_tokenizer()
    with pytest.raises(VersionNotFoundError):
        store.resolve("smollm2-135m")
    root = store.import_model(model, tokenizer, reference="smollm2-135m")
    store.import_model(tiny_model("llama", seed=1), tokenizer, reference="/models/tiny")
    assert store.resolve("smollm2-135m") == root.id
    assert store.get("smollm2-135m").id == root.id
    with pytest.raises(VersionNotFoundError):
        store.resolve("/models/tiny")
