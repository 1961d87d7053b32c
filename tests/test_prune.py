"""Pruning on tiny random models of several families: structure, equivalence, export."""

from __future__ import annotations

import copy
import json
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.checkpoints.sparse import MIN_ELEMENTS, SPARSE_BITMASK
from modelsurgery.editing.registry import MethodContext
from modelsurgery.models.adapters import Projection, get_adapter
from modelsurgery.models.digest import persistent_state_dict
from modelsurgery.pruning import apply_pruned_config
from modelsurgery.pruning.config import PruneConfig
from modelsurgery.pruning.metrics import block_projections
from modelsurgery.pruning.prune import prune_model

VOCAB = 128


def tiny(family: str) -> nn.Module:
    """64 positions, bos = eos = 0 and no pad id (OPT's is 1); GPT-2 gets non-zero biases."""
    pad = 1 if family == "opt" else None
    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": pad}
    model = tiny_model(family, max_position_embeddings=64, **ids)
    if family == "gpt2":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    return model


FAMILIES = {family: partial(tiny, family) for family in ("llama", "gpt2", "opt", "gpt_neox")}


@pytest.fixture
def context(tmp_path: Path) -> MethodContext:
    return MethodContext(model_digest="test", cache_dir=tmp_path)


def calib_ids(n: int = 6, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(1))


def config(**fields: object) -> PruneConfig:
    defaults = {"calibration_batch_size": 4, "calibration_dtype": "float32"}
    return PruneConfig(**{**defaults, **fields})


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def dense_width(model: nn.Module) -> int:
    return get_adapter(model).intermediate_size


def mask_removed(dense: nn.Module, kept: dict[str, dict[str, list[int]]]) -> None:
    """Zero the removed neurons' down-projection columns and removed heads' o_proj columns."""
    adapter = get_adapter(dense)
    group = adapter.num_heads // adapter.num_kv_heads
    with torch.no_grad():
        for layer, parts in kept.items():
            i = int(layer)
            down = adapter.mlp_out(i).weight
            removed = sorted(set(range(down.shape[1])) - set(parts["mlp_neurons"]))
            down[:, removed] = 0
            if "kv_heads" not in parts:
                continue
            for g in set(range(adapter.num_kv_heads)) - set(parts["kv_heads"]):
                for h in range(g * group, (g + 1) * group):
                    adapter.attn_out(i).weight[:, adapter.head_columns(h)] = 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("score", ["activation", "wanda", "magnitude"])
def test_structured_forward_equals_masked_dense(family: str, score: str, context) -> None:
    model = FAMILIES[family]()
    dense = copy.deepcopy(model)
    heads = 1 if family == "llama" else None
    result = prune_model(
        model,
        config(kind="structured", ratio=0.25, score=score, prune_heads=heads),
        calib_ids(),
        context,
    )
    kept = json.loads(result.artifacts["kept_structure.json"])
    mask_removed(dense, kept)
    ids = calib_ids(2, 16)
    torch.testing.assert_close(logits(model, ids), logits(dense, ids), atol=1e-5, rtol=1e-4)

    adapter = get_adapter(model)
    width = adapter.intermediate_size
    assert all(len(parts["mlp_neurons"]) == width for parts in kept.values())
    assert result.metrics["parameters_after"] < result.metrics["parameters_before"]
    assert result.metrics["bytes_after"] < result.metrics["bytes_before"]
    key = adapter.layout.intermediate_key
    assert result.config_overrides[key] == width == 3 * dense_width(dense) // 4
    if heads:
        assert result.config_overrides["num_key_value_heads"] == 1
        assert result.config_overrides["num_attention_heads"] == 2
        assert adapter.attn_qkv(0)["q"].weight.shape == (32, 64)
        assert adapter.attn_qkv(0)["k"].weight.shape == (16, 64)
        assert adapter.attn_out(0).weight.shape == (64, 32)


def test_structured_scores_prefer_active_neurons(context) -> None:
    """A neuron whose down column is zero contributes nothing and is removed first."""
    model = tiny("llama")
    with torch.no_grad():
        get_adapter(model).mlp_out(0).weight[:, :32] = 0
    result = prune_model(model, config(kind="structured", ratio=0.25), calib_ids(), context)
    kept = json.loads(result.artifacts["kept_structure.json"])
    assert kept["0"]["mlp_neurons"] == list(range(32, 128))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_changed_tensors_match_the_model(family: str, context) -> None:
    model = FAMILIES[family]()
    result = prune_model(
        model, config(kind="structured", ratio=0.5, bias_compensation=True), calib_ids(), context
    )
    state = persistent_state_dict(model)
    assert result.changed
    for name, tensor in result.changed.items():
        assert torch.equal(state[name], tensor), name


def _mlp_output_mean(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    adapter = get_adapter(model)
    mlp = model.get_submodule(adapter.mlp_out_path(0).rpartition(".")[0])
    outputs: list[torch.Tensor] = []
    handle = mlp.register_forward_hook(lambda _m, _a, out: outputs.append(out.detach()))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return outputs[0].reshape(-1, outputs[0].shape[-1]).mean(0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bias_compensation_keeps_mean_mlp_output(family: str, context) -> None:
    model = FAMILIES[family]()
    ids = calib_ids()
    dense_mean = _mlp_output_mean(model, ids)
    plain = copy.deepcopy(model)
    result = prune_model(
        model, config(kind="structured", ratio=0.5, bias_compensation=True), ids, context
    )
    prune_model(plain, config(kind="structured", ratio=0.5), ids, context)
    assert result.metrics["bias_compensation"] == 1.0
    compensated_error = (_mlp_output_mean(model, ids) - dense_mean).norm()
    plain_error = (_mlp_output_mean(plain, ids) - dense_mean).norm()
    assert compensated_error < 1e-4 * dense_mean.norm()
    assert plain_error > 100 * compensated_error
    if family == "llama":
        assert result.config_overrides["mlp_bias"] is True


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_nm_pattern_in_every_block(family: str, n: int, m: int, context) -> None:
    model = FAMILIES[family]()
    adapter = get_adapter(model)
    prune_model(model, config(kind="nm", n=n, m=m), calib_ids(), context)
    for name, module in block_projections(adapter, list(range(adapter.num_layers))).items():
        weight = Projection(module, adapter.layout.conv1d).weight
        zeros = (weight == 0).reshape(weight.shape[0], -1, m).sum(-1)
        assert torch.all(zeros == n), name


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("score", ["wanda", "magnitude"])
def test_unstructured_sparsity_exact_per_row(family: str, score: str, context) -> None:
    model = FAMILIES[family]()
    adapter = get_adapter(model)
    result = prune_model(
        model, config(kind="unstructured", ratio=0.3, score=score), calib_ids(), context
    )
    for name, module in block_projections(adapter, [0, 1]).items():
        weight = Projection(module, adapter.layout.conv1d).weight
        expected = round(0.3 * weight.shape[1])
        assert torch.all((weight == 0).sum(1) == expected), name
    table = json.loads(result.artifacts["layer_sparsity.json"])
    assert len(table) == len(block_projections(adapter, [0, 1]))
    assert result.metrics["sparsity"] == pytest.approx(
        sum(r["sparsity"] for r in table) / len(table), abs=0.02
    )


def test_wanda_removes_lowest_weight_times_input_norm(context) -> None:
    """Layer 0's q_proj sees the dense model's normed embeddings: its mask follows from them."""
    model = tiny("llama")
    ids = calib_ids()
    seen: list[torch.Tensor] = []
    q_proj = get_adapter(model).attn_qkv(0)["q"]
    handle = q_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    x = seen[0].reshape(-1, seen[0].shape[-1])
    score = q_proj.weight.detach().abs() * x.norm(dim=0)
    expected = score <= score.kthvalue(32, dim=1, keepdim=True).values
    prune_model(model, config(kind="unstructured", ratio=0.5, score="wanda"), ids, context)
    assert torch.equal(q_proj.weight == 0, expected)


def _save_and_reload(model: nn.Module, path: Path) -> nn.Module:
    model.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_structured_export_reloads_with_from_pretrained(family: str, context, tmp_path) -> None:
    model = FAMILIES[family]()
    heads = 1 if family == "llama" else None
    prune_model(
        model,
        config(kind="structured", ratio=0.25, prune_heads=heads, bias_compensation=True),
        calib_ids(),
        context,
    )
    reloaded = _save_and_reload(model, tmp_path / "export")
    ids = calib_ids(2, 16)
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids))
    assert sum(p.numel() for p in reloaded.parameters()) == sum(
        p.numel() for p in model.parameters()
    )


def test_nm_export_reloads_dense(context, tmp_path) -> None:
    model = tiny("llama")
    prune_model(model, config(kind="nm"), calib_ids(), context)
    reloaded = _save_and_reload(model, tmp_path / "export")
    ids = calib_ids(2, 16)
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids))


@pytest.mark.parametrize("kind", ["unstructured", "nm"])
def test_sparse_result_is_stored_compactly_and_exports_dense(kind, context, tmp_path) -> None:
    model = tiny("llama")
    store = CheckpointStore(tmp_path / "store")
    base = store.import_model(model, None, reference="tiny")
    result = prune_model(model, config(kind=kind, ratio=0.5), calib_ids(), context)
    child = store.commit(base.id, result.changed, operations=[{"method": "prune"}])
    large = [e for e in child.tensors.values() if e.nbytes >= 4 * MIN_ELEMENTS]
    assert large and {e.encoding for e in large} == {SPARSE_BITMASK}
    stored = sum(store.layout.tensor_blob(e.blob).stat().st_size for e in large)
    dense = sum(e.nbytes for e in large)
    assert stored < 0.6 * dense
    reloaded = AutoModelForCausalLM.from_pretrained(store.export(child.id, tmp_path / "export"))
    ids = calib_ids(2, 16)
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids))


def test_non_uniform_widths_load_through_apply_pruned_config(context, tmp_path) -> None:
    model = tiny("llama")
    result = prune_model(
        model,
        config(
            kind="structured",
            per_layer_ratios={0: 0.25, 1: 0.5},
            uniform_widths=False,
            prune_heads=1,
            layers=[1],
        ),
        calib_ids(),
        context,
    )
    assert result.config_overrides["modelsurgery_mlp_widths"] == [128, 64]
    assert result.config_overrides["modelsurgery_kv_heads"] == [2, 1]
    model.save_pretrained(tmp_path / "export")
    with pytest.raises((RuntimeError, ValueError)):
        AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    config_reloaded = LlamaConfig.from_pretrained(tmp_path / "export")
    fresh = LlamaForCausalLM(config_reloaded).eval()
    apply_pruned_config(fresh)
    from safetensors.torch import load_file

    state = load_file(tmp_path / "export" / "model.safetensors")
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}
    fresh.tie_weights()
    ids = calib_ids(2, 16)
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids))


def test_head_pruning_gqa_shapes(context) -> None:
    model = tiny("llama")
    prune_model(model, config(kind="structured", ratio=0.1, prune_heads=0.5), calib_ids(), context)
    adapter = get_adapter(model)
    for i in range(adapter.num_layers):
        qkv = adapter.attn_qkv(i)
        assert qkv["q"].weight.shape[0] == 2 * 16
        assert qkv["k"].weight.shape[0] == qkv["v"].weight.shape[0] == 16
        assert adapter.attn_out(i).weight.shape[1] == 2 * 16
    assert model.config.num_key_value_heads == 1
    assert model.config.head_dim == 16
    assert logits(model, calib_ids(1, 8)).shape == (1, 8, VOCAB)
