"""Biased-head scoring: the head mask, gradient vs ablation scores, head selection."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from conftest import tiny_model
from transformers import PreTrainedModel

from modelsurgery.editing.bias.scoring import (
    HeadMask,
    HeadScores,
    ablation_scores,
    lm_loss,
    score_heads,
    select_heads,
)
from modelsurgery.editing.mask_heads import mask_heads_in_place
from modelsurgery.editing.stereotypes.metrics import (
    BiasObjective,
    TokenizedPair,
    pair_gaps,
    summarize_gaps,
)
from modelsurgery.models.adapters import get_adapter

DRIVER = (1, 2)  # the head the constructed case makes responsible for the gap
TINY = {"max_position_embeddings": 64, "pad_token_id": None}
tiny_llama, tiny_gpt2 = partial(tiny_model, "llama", **TINY), partial(tiny_model, "gpt2", **TINY)


def minimal_pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    """Random sentences (start token 1) whose twins differ in one token, like CrowS-Pairs."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        length = int(torch.randint(6, 11, (1,), generator=g))
        stereo = torch.randint(2, 128, (length,), generator=g).tolist()
        anti = list(stereo)
        anti[length // 2] = (anti[length // 2] + 7) % 126 + 2
        pairs.append(TokenizedPair((1, *stereo), (1, *anti)))
    return pairs


def driven_case() -> tuple[PreTrainedModel, list[TokenizedPair]]:
    """A model whose head DRIVER is amplified, and pairs each oriented so that this head
    raises the gap: it drives the bias on every pair, while the other heads' effects have
    mixed signs and partly cancel."""
    model = tiny_llama()
    adapter = get_adapter(model)
    with torch.no_grad():
        adapter.attn_out(DRIVER[0]).weight[:, adapter.head_columns(DRIVER[1])] *= 3
    pairs = minimal_pairs(16)
    with HeadMask(model) as mask:
        full = pair_gaps(model, pairs)
        mask.values[DRIVER] = 0.0
        effect = full - pair_gaps(model, pairs)
    oriented = [
        p if e > 0 else TokenizedPair(p.anti, p.stereo)
        for p, e in zip(pairs, effect.tolist(), strict=True)
    ]
    return model, oriented


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama-gqa", "gpt2"])
def test_head_mask_zero_equals_masked_weights(build) -> None:
    """Zeroing a head's mask value at run time == zeroing its o_proj columns (so the head
    that was scored is exactly the head that gets masked), and a masked head contributes
    nothing: its own value no longer matters."""
    model = build()
    masked = copy.deepcopy(model)
    mask_heads_in_place(masked, [(0, 1), (1, 3)])
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), HeadMask(model) as mask:
        mask.values[0, 1] = 0.0
        mask.values[1, 3] = 0.0
        hooked = model(ids).logits
    with torch.no_grad(), HeadMask(masked) as mask:
        plain = masked(ids).logits
        mask.values[0, 1] = 5.0
        rescaled = masked(ids).logits
    torch.testing.assert_close(hooked, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(rescaled, plain, rtol=0, atol=1e-6)


def test_gqa_heads_sharing_a_kv_head_are_scored_apart() -> None:
    model = tiny_llama()
    adapter = get_adapter(model)
    assert adapter.num_kv_heads == 2 and adapter.kv_group(0) == adapter.kv_group(1)
    scores = score_heads(model, None, minimal_pairs(4), rank_by="ablation")
    assert scores.gradient.shape == (2, 4)
    assert scores.gradient[0, 0] != scores.gradient[0, 1]
    assert scores.ablation is not None and scores.ablation[0, 0] != scores.ablation[0, 1]


@pytest.mark.parametrize(
    "objective", [BiasObjective("gap"), BiasObjective("share", 0.5)], ids=["gap", "share"]
)
def test_gradient_matches_finite_difference(objective: BiasObjective) -> None:
    model = tiny_llama().double()
    pairs = minimal_pairs(5)
    # batch_size 4 = two pairs per batch: the non-linear objective is summed over batches
    scores = score_heads(model, None, pairs, objective=objective, batch_size=4)
    eps = 1e-4
    with HeadMask(model) as mask:
        base = objective.value(pair_gaps(model, pairs))
        assert base == pytest.approx(scores.base_objective, abs=1e-6)
        for layer, head in [(0, 0), (0, 3), (1, 1)]:
            mask.values[layer, head] = 1.0 + eps
            up = objective.value(pair_gaps(model, pairs))
            mask.values[layer, head] = 1.0
            assert (up - base) / eps == pytest.approx(
                float(scores.gradient[layer, head]), rel=1e-2, abs=1e-4
            )


def test_gradient_and_ablation_agree_on_the_driving_head() -> None:
    model, pairs = driven_case()
    params_before = [p.detach().clone() for p in model.parameters()]
    scores = score_heads(model, None, pairs, rank_by="ablation")
    assert scores.ablation is not None
    assert scores.gradient[DRIVER] > 0 and scores.ablation[DRIVER] > 0
    assert select_heads(scores.gradient, top_k=1) == [DRIVER]
    assert select_heads(scores.ablation, top_k=1) == [DRIVER]
    # scoring leaves the model as it was: no hooks, no weight change, grads restored
    for p, before in zip(model.parameters(), params_before, strict=True):
        assert torch.equal(p, before) and p.requires_grad and p.grad is None
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_masking_the_driving_head_reduces_the_gap() -> None:
    model, pairs = driven_case()
    before = summarize_gaps(pair_gaps(model, pairs))
    mask_heads_in_place(model, select_heads(score_heads(model, None, pairs).gradient, top_k=1))
    after = summarize_gaps(pair_gaps(model, pairs))
    assert after["bias_gap"] < before["bias_gap"]


def test_shortlist_ablates_only_the_best_gradient_heads() -> None:
    model, pairs = driven_case()
    full = score_heads(model, None, pairs, rank_by="ablation")
    short = score_heads(model, None, pairs, rank_by="shortlist", shortlist_size=3)
    assert full.ablation is not None and short.ablation is not None
    measured = {(int(i) // 4, int(i) % 4) for i in torch.nonzero(~short.ablation.isnan().flatten())}
    assert measured == set(select_heads(short.gradient, top_k=3))
    for head in measured:
        assert float(short.ablation[head]) == pytest.approx(float(full.ablation[head]), abs=1e-6)
    assert select_heads(short.ranking, top_k=1) == [DRIVER]
    assert select_heads(short.ranking, top_k=8) == select_heads(short.ablation, top_k=3)


def test_perplexity_penalty_charges_the_lm_loss_a_head_adds() -> None:
    model, pairs = driven_case()
    calibration = torch.randint(2, 128, (3, 12), generator=torch.Generator().manual_seed(5))
    heads = [DRIVER, (0, 0)]
    drop, added = ablation_scores(
        model, pairs, heads, BiasObjective(), calibration=calibration, batch_size=4
    )
    assert added is not None
    masked = copy.deepcopy(model)
    mask_heads_in_place(masked, [DRIVER])
    expected = lm_loss(masked, calibration) - lm_loss(model, calibration)
    assert float(added[DRIVER]) == pytest.approx(expected, abs=1e-5)
    assert int(torch.isnan(added).sum()) == 8 - len(heads)

    scores = HeadScores(
        BiasObjective(), "shortlist", torch.zeros(2, 4), torch.zeros(3), drop, added, 0.0
    )
    assert torch.equal(scores.ranking.nan_to_num(), drop.nan_to_num())
    scores.perplexity_penalty = 2.0
    torch.testing.assert_close(scores.ranking, drop - 2.0 * added, equal_nan=True)
    table = scores.to_json_dict([DRIVER])
    assert table["loss_increase"][0][1] is None and table["perplexity_penalty"] == 2.0


def test_share_objective_bounds_outlier_pairs() -> None:
    gaps = torch.tensor([0.0, 20.0, -20.0, 1.0], dtype=torch.float64)
    share = BiasObjective("share", 1.0)
    assert share.value(gaps) == pytest.approx((0.5 + 1.0 + 0.0 + float(torch.sigmoid(gaps[3]))) / 4)
    # shifting the outliers changes the raw mean gap a lot but the smooth share hardly at all
    shifted = gaps + torch.tensor([0.0, 30.0, 0.0, 0.0], dtype=torch.float64)
    assert BiasObjective("gap").value(shifted) - BiasObjective("gap").value(gaps) == 7.5
    assert abs(share.value(shifted) - share.value(gaps)) < 1e-8


def test_select_heads_top_k_and_z_threshold() -> None:
    scores = torch.tensor([[0.1, 3.0, -0.2], [0.0, 1.0, 0.05]])
    assert select_heads(scores, top_k=2) == [(0, 1), (1, 1)]
    assert select_heads(scores, z_threshold=1.5) == [(0, 1)]
    assert select_heads(scores, z_threshold=10.0) == []
    partial = torch.tensor([[float("nan"), 3.0, -0.2], [0.0, float("nan"), 0.05]])
    assert select_heads(partial, top_k=2) == [(0, 1), (1, 2)]
    assert select_heads(partial, top_k=9) == [(0, 1), (1, 2), (1, 0), (0, 2)]
    assert select_heads(partial, z_threshold=1.0) == [(0, 1)]
    with pytest.raises(ValueError, match="exactly one"):
        select_heads(scores, top_k=1, z_threshold=1.0)


def test_summarize_gaps_counts_ties_half() -> None:
    metrics = summarize_gaps(torch.tensor([1.0, -2.0, 0.0, 3.0]))
    assert metrics["stereotype_share"] == pytest.approx(0.625)
    assert metrics["bias_gap"] == pytest.approx(0.5)
