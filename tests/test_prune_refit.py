"""Refit after the mask (SparseGPT's OBS update), RIA scores and OWL ratios on tiny models."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from torch import nn

from modelsurgery.editing.registry import JobCancelled, MethodContext
from modelsurgery.models.adapters import Projection, get_adapter
from modelsurgery.pruning.calibration import LayerwiseCalibration
from modelsurgery.pruning.config import PruneConfig
from modelsurgery.pruning.gram import GramSum, uses_bfloat16_products
from modelsurgery.pruning.masks import nm_prune_mask, row_prune_mask_count
from modelsurgery.pruning.metrics import block_projections
from modelsurgery.pruning.owl import outlier_ratio, owl_ratios
from modelsurgery.pruning.prune import prune_model
from modelsurgery.pruning.refit import (
    Sparsity,
    importance,
    inverse_hessian_factor,
    refit_weight,
    refit_weights,
)
from modelsurgery.pruning.scores import ria_scores
from modelsurgery.pruning.sequential import input_groups

VOCAB = 128


def tiny(family: str = "llama", **overrides: object) -> nn.Module:
    pad = 1 if family == "opt" else None
    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": pad}
    return tiny_model(family, max_position_embeddings=64, **ids, **overrides)


def calib_ids(n: int = 6, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(1))


def config(**fields: object) -> PruneConfig:
    return PruneConfig(**{"calibration_batch_size": 4, "calibration_dtype": "float32", **fields})


@pytest.fixture
def context(tmp_path: Path) -> MethodContext:
    return MethodContext(model_digest="test", cache_dir=tmp_path)


def correlated_inputs(tokens: int = 512, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(size, size, generator=generator)
    return torch.randn(tokens, size, generator=generator) @ mixing


@pytest.mark.parametrize("sparsity", [Sparsity(ratio=0.5), Sparsity(n=2, m=4)])
def test_refit_beats_zeroing_the_same_mask(sparsity: Sparsity) -> None:
    x = correlated_inputs()
    dense = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    refitted = dense.clone()
    gram = (x.T @ x).double()
    weight_importance = importance("wanda", dense, gram.diagonal().sqrt().float())
    mask = refit_weight(refitted, inverse_hessian_factor(gram, 0.01), sparsity, weight_importance)
    zeroed = dense.masked_fill(mask, 0.0)
    assert torch.equal(refitted == 0, mask)
    assert mask.float().mean() == 0.5
    refit_error = (x @ (refitted - dense).T).norm()
    zero_error = (x @ (zeroed - dense).T).norm()
    assert refit_error < 0.95 * zero_error


def _unblocked_obs(
    weight: torch.Tensor, gram: torch.Tensor, sparsity: Sparsity, weight_importance: torch.Tensor
) -> torch.Tensor:
    """SparseGPT's update written plainly, in float64: column by column over the whole matrix,
    U from H^-1 by a Cholesky of the inverse, the mask chosen where ``refit_weight`` chooses it
    (every block for unstructured, every sub-block for N:M) on the weights updated so far."""
    w = weight.double().clone()
    h = gram.double() + 0.01 * gram.diagonal().mean() * torch.eye(
        gram.shape[0], dtype=torch.float64
    )
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    mask = torch.zeros_like(w, dtype=torch.bool)
    columns = w.shape[1]
    every = sparsity.sub_block() if sparsity.m else sparsity.block()
    for i in range(columns):
        if i % every == 0:
            end = min(i + every, columns)
            scores = w[:, i:end].abs() * weight_importance[:, i:end]
            if sparsity.m:
                mask[:, i:end] = nm_prune_mask(scores, sparsity.n, sparsity.m)
            else:
                count = sparsity.removed_before(end) - sparsity.removed_before(i)
                mask[:, i:end] = row_prune_mask_count(scores, count)
        error = w[:, i] * mask[:, i] / u[i, i]
        w[:, i:] -= torch.outer(error, u[i, i:])
    return w.masked_fill(mask, 0.0)


@pytest.mark.parametrize("sparsity", [Sparsity(ratio=0.4), Sparsity(n=2, m=4)])
def test_blocked_sweep_equals_the_unblocked_update(sparsity: Sparsity) -> None:
    """Two block levels and the transposed layout change only the order of the arithmetic:
    200 columns span a full block of 128 and a partial one with a partial sub-block."""
    x = correlated_inputs(tokens=400, size=200)
    gram = (x.T @ x).double()
    dense = torch.randn(12, 200, generator=torch.Generator().manual_seed(3))
    weight_importance = importance("ria", dense, gram.diagonal().sqrt().float())
    refitted = dense.clone()
    refit_weight(refitted, inverse_hessian_factor(gram, 0.01), sparsity, weight_importance)
    expected = _unblocked_obs(dense, gram, sparsity, weight_importance)
    assert torch.equal(refitted == 0, expected == 0)
    torch.testing.assert_close(refitted.double(), expected, rtol=1e-4, atol=1e-4)


def test_inverse_hessian_factor_is_the_upper_cholesky_factor_of_the_inverse() -> None:
    x = correlated_inputs(size=48)
    gram = (x.T @ x).double()
    gram[:, 5] = gram[5, :] = 0.0  # an input that is always zero
    u = inverse_hessian_factor(gram, 0.01).double()
    damped = gram.clone()
    damped[5, 5] = 1.0
    damped += 0.01 * damped.diagonal().mean() * torch.eye(48, dtype=torch.float64)
    assert torch.equal(u, u.triu())
    torch.testing.assert_close(
        u.T @ u @ damped, torch.eye(48, dtype=torch.float64), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("sparsity", [Sparsity(ratio=0.5), Sparsity(n=2, m=4)])
def test_one_sweep_for_a_shared_input_equals_one_per_matrix(sparsity: Sparsity) -> None:
    """q/k/v (gate/up) read one input: stacked into one sweep, each comes out as alone."""
    x = correlated_inputs(size=64)
    gram = (x.T @ x).double()
    factor = inverse_hessian_factor(gram, 0.01)
    generator = torch.Generator().manual_seed(4)
    dense = [torch.randn(rows, 64, generator=generator) for rows in (24, 8, 8)]
    importances = [importance("ria", w, gram.diagonal().sqrt().float()) for w in dense]
    alone = [w.clone() for w in dense]
    pairs = zip(alone, importances, strict=True)
    masks_alone = [refit_weight(w, factor, sparsity, i) for w, i in pairs]
    stacked = [w.clone() for w in dense]
    masks_stacked = refit_weights(stacked, factor, sparsity, importances)
    for a, s, mask_a, mask_s in zip(alone, stacked, masks_alone, masks_stacked, strict=True):
        assert torch.equal(mask_a, mask_s)
        assert torch.equal(s == 0, mask_s)
        torch.testing.assert_close(s, a, rtol=1e-5, atol=1e-5)


def _input_of(model: nn.Module, module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


@pytest.mark.parametrize("kind", ["unstructured", "nm"])
def test_refit_reduces_layer_output_error(kind: str, context) -> None:
    """Layer 0's attention inputs are the same with and without pruning: its q/k/v outputs
    on the calibration tokens stay closer to the dense ones after the refit."""
    dense = tiny()
    ids = calib_ids()
    errors = {}
    for refit in ("none", "sparsegpt"):
        model = copy.deepcopy(dense)
        prune_model(model, config(kind=kind, score="wanda", refit=refit), ids, context)
        total = 0.0
        for role, module in get_adapter(model).attn_qkv(0).items():
            reference = get_adapter(dense).attn_qkv(0)[role]
            x = _input_of(dense, reference, ids)
            total += float((x @ (module.weight - reference.weight).T.detach()).norm() ** 2)
        errors[refit] = total
    assert errors["sparsegpt"] < 0.95 * errors["none"]


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox"])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_nm_pattern_holds_after_refit(family: str, n: int, m: int, context) -> None:
    model = tiny(family)
    adapter = get_adapter(model)
    result = prune_model(
        model, config(kind="nm", n=n, m=m, refit="sparsegpt"), calib_ids(), context
    )
    modules = block_projections(adapter, list(range(adapter.num_layers)))
    for name, module in modules.items():
        weight = Projection(module, adapter.layout.conv1d).weight
        zeros = (weight == 0).reshape(weight.shape[0], -1, m).sum(-1)
        assert torch.all(zeros == n), name
        assert torch.equal(result.changed[f"{name}.weight"], module.weight)


def test_unstructured_refit_keeps_exact_row_sparsity(context) -> None:
    model = tiny("gpt2")
    adapter = get_adapter(model)
    prune_model(
        model,
        config(kind="unstructured", ratio=0.3, score="ria", refit="sparsegpt"),
        calib_ids(),
        context,
    )
    for name, module in block_projections(adapter, [0, 1]).items():
        weight = Projection(module, adapter.layout.conv1d).weight
        assert torch.all((weight == 0).sum(1) == round(0.3 * weight.shape[1])), name


def test_ria_score_by_hand() -> None:
    weight = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    input_l2 = torch.tensor([4.0, 9.0])
    # column sums |W|: 4, 6; row sums: 3, 7; sqrt(||X||): 2, 3
    expected = torch.tensor(
        [
            [(1 / 4 + 1 / 3) * 2, (2 / 6 + 2 / 3) * 3],
            [(3 / 4 + 3 / 7) * 2, (4 / 6 + 4 / 7) * 3],
        ]
    )
    torch.testing.assert_close(ria_scores(weight, input_l2), expected)
    block = ria_scores(
        weight[:, 1:],
        input_l2[1:],
        row_sums=torch.tensor([3.0, 7.0]),
        column_sums=torch.tensor([6.0]),
    )
    torch.testing.assert_close(block, expected[:, 1:])


def test_owl_ratios_average_to_the_target_and_follow_outliers() -> None:
    ratios = owl_ratios({0: 0.01, 1: 0.05, 2: 0.03, 3: 0.02}, target=0.7, spread=0.08)
    assert sum(ratios.values()) / 4 == pytest.approx(0.7, abs=1e-6)
    assert ratios[1] < ratios[2] < ratios[3] < ratios[0]
    assert max(ratios.values()) - min(ratios.values()) == pytest.approx(0.16, abs=1e-6)
    assert owl_ratios({0: 0.02, 1: 0.02}, 0.5, 0.08) == {0: 0.5, 1: 0.5}
    scores = [torch.ones(10, 10), torch.tensor([[100.0, 1.0]])]
    assert outlier_ratio(scores, threshold=5.0) == pytest.approx(1 / 102)


def test_owl_prunes_the_layer_with_outliers_less(context) -> None:
    model = tiny()
    with torch.no_grad():
        for module in block_projections(get_adapter(model), [1]).values():
            module.weight[:, :2] *= 50.0  # a few huge weights: outliers of Wanda's score
    result = prune_model(
        model, config(kind="unstructured", ratio=0.6, per_layer_ratios="owl"), calib_ids(), context
    )
    ratios = result.resolved["per_layer_ratios"]
    assert ratios[1] < 0.6 < ratios[0]
    assert sum(ratios.values()) / 2 == pytest.approx(0.6, abs=1e-6)
    table = json.loads(result.artifacts["layer_ratios.json"])
    assert table["rule"] == "owl" and table["ratio"] == {"0": ratios[0], "1": ratios[1]}
    sparsity = {
        r["module"]: r["sparsity"] for r in json.loads(result.artifacts["layer_sparsity.json"])
    }
    assert sparsity["model.layers.1.mlp.down_proj"] < sparsity["model.layers.0.mlp.down_proj"]


def test_the_version_records_what_ran(context) -> None:
    default = prune_model(tiny(), config(), calib_ids(), context)
    assert (default.resolved["score"], default.resolved["refit"]) == ("wanda", "sparsegpt")
    nm = prune_model(tiny(), config(kind="nm"), calib_ids(), context)
    assert (nm.resolved["score"], nm.resolved["refit"]) == ("ria", "sparsegpt")
    assert default.resolved["refit_inputs"] == "pruned"
    dense = prune_model(tiny(), config(kind="nm", refit_inputs="dense"), calib_ids(), context)
    assert dense.resolved["refit_inputs"] == "dense"
    wanda = prune_model(tiny(), config(score="wanda"), calib_ids(), context)
    assert (wanda.resolved["score"], wanda.resolved["refit"]) == ("wanda", "none")
    assert "per_layer_ratios" not in wanda.resolved and "refit_inputs" not in wanda.resolved


def test_cancel_between_layers_leaves_later_layers_untouched(context) -> None:
    model = tiny()
    dense = copy.deepcopy(model)
    events: list[dict[str, object]] = []
    context.report = events.append
    context.is_cancelled = lambda: any(e.get("step") == 1 for e in events)
    with pytest.raises(JobCancelled):
        prune_model(model, config(kind="nm"), calib_ids(), context)
    adapter, dense_adapter = get_adapter(model), get_adapter(dense)
    assert not torch.equal(adapter.mlp_out(0).weight, dense_adapter.mlp_out(0).weight)
    for name, module in block_projections(adapter, [1]).items():
        assert torch.equal(module.weight, dense.get_submodule(name).weight), name


def _batches(tokens: int = 256, size: int = 48, count: int = 3) -> list[torch.Tensor]:
    """Correlated inputs with a mean, the shape calibration gives: [batch, seq, features]."""
    generator = torch.Generator().manual_seed(5)
    mixing = torch.randn(size, size, generator=generator) * 0.3
    offset = torch.randn(size, generator=generator)
    return [
        (torch.randn(2, tokens // 2, size, generator=generator) @ mixing + offset)
        for _ in range(count)
    ]


def _float64_gram(batches: list[torch.Tensor]) -> torch.Tensor:
    flat = torch.cat([b.reshape(-1, b.shape[-1]) for b in batches]).double()
    return flat.T @ flat


def test_gram_sum_matches_float64() -> None:
    batches = _batches()
    total = GramSum(48, torch.device("cpu"), bfloat16_products=False)
    for batch in batches:
        total.add(batch)
    reference = _float64_gram(batches)
    assert total.total.dtype == torch.float64
    torch.testing.assert_close(total.total, reference, rtol=0, atol=1e-5 * reference.abs().max())


def test_gram_sum_of_bfloat16_inputs_adds_no_rounding_of_its_own() -> None:
    """bfloat16 products (bfloat16 inputs as autocast gives them, float32 sums): the float64
    Gram matrix to float32's precision, where a bfloat16 result would be off by ~4e-3 of an
    entry; float32 inputs are not rounded; the process-wide oneDNN setting is restored."""
    batches = _batches()
    before = torch.backends.mkldnn.matmul.fp32_precision
    for inputs in ([b.bfloat16() for b in batches], batches):
        total = GramSum(48, torch.device("cpu"), bfloat16_products=True)
        for batch in inputs:
            total.add(batch)
        assert torch.backends.mkldnn.matmul.fp32_precision == before
        reference = _float64_gram(inputs)
        scale = reference.abs().max()
        torch.testing.assert_close(total.total, reference, rtol=0, atol=1e-5 * scale)


def test_bfloat16_products_only_under_bfloat16_calibration_on_a_cpu() -> None:
    cpu = torch.device("cpu")
    assert uses_bfloat16_products(cpu, torch.bfloat16) == torch.backends.mkldnn.is_available()
    assert not uses_bfloat16_products(cpu, torch.float32)
    assert not uses_bfloat16_products(torch.device("cuda"), torch.bfloat16)


def _layer_inputs(model: nn.Module, index: int, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every linear layer's input in layer ``index`` of an unchanged forward, flattened."""
    modules = block_projections(get_adapter(model), [index])
    seen: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_pre_hook(
            lambda _m, args, name=name: seen.setdefault(name, args[0].detach())
        )
        for name, module in modules.items()
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return {name: x.reshape(-1, x.shape[-1]).double() for name, x in seen.items()}


@pytest.mark.parametrize("limit", [None, 1])
def test_input_groups_in_forward_order_with_their_gram_matrices(limit: int | None) -> None:
    """One pass groups the modules by the tensor they read (q/k/v, o, gate/up, down), in
    forward order, each with the Gram matrix of that input over all batches; ``limit`` 1
    stops at the first group (the pass per group of ``refit_inputs: pruned``)."""
    model = tiny()
    ids = calib_ids()
    adapter = get_adapter(model)
    calibration = LayerwiseCalibration(model, adapter, ids, batch_size=4)
    inputs = calibration.run_layer(0, calibration.capture())
    modules = block_projections(adapter, [1])
    groups = input_groups(calibration, 1, inputs, modules, limit)
    prefix = "model.layers.1."
    expected = [
        [f"{prefix}self_attn.{r}_proj" for r in "kqv"],
        [f"{prefix}self_attn.o_proj"],
        [f"{prefix}mlp.gate_proj", f"{prefix}mlp.up_proj"],
        [f"{prefix}mlp.down_proj"],
    ]
    assert [sorted(names) for names, _ in groups] == (expected if limit is None else expected[:1])
    dense_inputs = _layer_inputs(model, 1, ids)
    for names, gram in groups:
        x = dense_inputs[names[0]]
        reference = x.T @ x
        torch.testing.assert_close(gram, reference, rtol=0, atol=1e-5 * reference.abs().max())


def test_dense_refit_inputs_give_a_valid_refit(context) -> None:
    """``refit_inputs: dense`` (one pass per layer) keeps the 2:4 pattern, records the
    setting and beats zeroing on layer 0's q/k/v outputs, like the pass per group."""
    ids = calib_ids()
    dense = tiny()
    errors = {}
    for refit, inputs in (("none", None), ("sparsegpt", "dense"), ("sparsegpt", "pruned")):
        model = copy.deepcopy(dense)
        cfg = config(kind="nm", score="wanda", refit=refit, refit_inputs=inputs)
        prune_model(model, cfg, ids, context)
        adapter = get_adapter(model)
        for name, module in block_projections(adapter, [0, 1]).items():
            zeros = (module.weight == 0).reshape(module.weight.shape[0], -1, 4).sum(-1)
            assert torch.all(zeros == 2), name
        total = 0.0
        for role, module in adapter.attn_qkv(0).items():
            reference = get_adapter(dense).attn_qkv(0)[role]
            x = _input_of(dense, reference, ids)
            total += float((x @ (module.weight - reference.weight).T.detach()).norm() ** 2)
        errors[(refit, inputs)] = total
    # layer 0's first group reads the same inputs either way: the same refit
    assert errors[("sparsegpt", "dense")] == pytest.approx(errors[("sparsegpt", "pruned")])
    assert errors[("sparsegpt", "dense")] < 0.95 * errors[("none", None)]
