"""mask_biased_heads on the real SmolLM2-135M (9 query heads sharing 3 KV heads), method level."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import modelsurgery.editing.bias  # noqa: F401  (registers the method)
from modelsurgery.editing.mask_heads import parse_head
from modelsurgery.editing.registry import MethodContext, get_method
from modelsurgery.models import get_adapter, load

pytestmark = pytest.mark.e2e


def table_tensor(rows: list[list[float | None]]) -> torch.Tensor:
    return torch.tensor([[math.nan if v is None else v for v in row] for row in rows])


def test_mask_biased_heads_on_gender_pairs(tmp_path: Path) -> None:
    loaded = load("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    method = get_method("mask_biased_heads")
    config = method.config_class(
        bias_types=["gender"],
        max_pairs=24,
        top_k=3,
        shortlist_size=4,
        calibration_windows=2,
        evaluate_perplexity=False,
        seed=0,
    )
    config.check_against(model.config)

    result = method.run(model, tokenizer, config, MethodContext(loaded.digest, tmp_path))

    m = result.metrics
    assert m["heads_masked"] == 3.0 and m["pairs_scored"] + m["pairs_heldout"] == 24.0
    assert 0.0 <= m["stereotype_share_before"] <= 1.0
    assert m["bias_gap_after"] != m["bias_gap_before"]
    table = json.loads(result.artifacts["head_scores.json"])
    assert (table["num_layers"], table["num_heads"]) == (30, 9)
    assert table["rank_by"] == "shortlist" and table["metric"] == "share"
    grad = torch.tensor(table["gradient"])
    ranking = table_tensor(table["ablation"]) - config.perplexity_penalty * table_tensor(
        table["loss_increase"]
    )
    shortlist = {(int(i) // 9, int(i) % 9) for i in grad.flatten().argsort()[-4:]}
    assert {(int(i) // 9, int(i) % 9) for i in torch.nonzero(~ranking.isnan().flatten())} == (
        shortlist
    )
    chosen = [parse_head(h) for h in table["chosen"]]
    assert [float(ranking[h]) for h in chosen] == sorted(
        ranking[~ranking.isnan()].tolist(), reverse=True
    )[:3]
    adapter = get_adapter(model)
    for layer, head in chosen:
        weight = result.changed[f"{adapter.attn_out_path(layer)}.weight"]
        assert torch.count_nonzero(weight[:, adapter.head_columns(head)]) == 0
