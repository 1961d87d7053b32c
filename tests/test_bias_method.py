"""The mask_biased_heads method end to end on a tiny model and tokenizer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import modelsurgery.editing.bias  # noqa: F401  (registers the method)
from modelsurgery.editing.mask_heads import parse_head
from modelsurgery.editing.registry import MethodContext, get_method
from modelsurgery.models.adapters import get_adapter
from modelsurgery.models.digest import persistent_state_dict

SUBJECTS = [("he", "she"), ("his", "her"), ("he", "they")]
ROLES = ["doctor", "engineer", "nurse", "football player", "piano player"]
PAIRS = [
    {"stereo": f"{a} is a good {role} .", "anti": f"{b} is a good {role} ."}
    for a, b in SUBJECTS
    for role in ROLES
]


def context(tmp_path: Path, roots: tuple[Path, ...] = ()) -> MethodContext:
    return MethodContext(model_digest="test", cache_dir=tmp_path / "cache", data_roots=roots)


def test_run_masks_top_heads_and_reports(tiny_llama, tiny_tokenizer, tmp_path: Path) -> None:
    method = get_method("mask_biased_heads")
    config = method.config_class(
        pairs=PAIRS,
        top_k=2,
        rank_by="gradient",
        holdout_fraction=0.4,
        seed=1,
    )
    config.check_against(tiny_llama.config)
    before = {k: v.clone() for k, v in persistent_state_dict(tiny_llama).items()}
    events: list[dict] = []
    ctx = context(tmp_path)
    ctx.report = events.append

    result = method.run(tiny_llama, tiny_tokenizer, config, ctx)

    m = result.metrics
    assert m["heads_masked"] == 2.0
    assert m["pairs_heldout"] == 6.0 and m["pairs_scored"] == 9.0
    for name in ("stereotype_share", "bias_gap"):
        assert {f"{name}_before", f"{name}_after"} <= set(m)
    assert 0.0 <= m["stereotype_share_after"] <= 1.0
    assert "perplexity_before" not in m  # measured by the executor, not the method

    table = json.loads(result.artifacts["head_scores.json"])
    assert (table["num_layers"], table["num_heads"]) == (2, 4)
    assert len(table["gradient"]) == 2 and len(table["gradient"][0]) == 4
    assert "ablation" not in table and table["metric"] == "share"
    chosen = [parse_head(h) for h in table["chosen"]]
    flat = sorted(
        (v, (layer, h)) for layer, row in enumerate(table["gradient"]) for h, v in enumerate(row)
    )
    assert set(chosen) == {head for _, head in flat[-2:]}

    adapter = get_adapter(tiny_llama)
    after = persistent_state_dict(tiny_llama)
    for layer, head in chosen:
        name = f"{adapter.attn_out_path(layer)}.weight"
        assert torch.equal(result.changed[name], after[name])
        assert torch.count_nonzero(after[name][:, adapter.head_columns(head)]) == 0
    assert set(result.changed) == {k for k in before if not torch.equal(before[k], after[k])}
    assert any(e.get("message") == "gradient scores" for e in events)


def test_pairs_file_and_ablation_ranking(tiny_llama, tiny_tokenizer, tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS[:8]))
    method = get_method("mask_biased_heads")
    config = method.config_class(
        pairs_file="pairs.jsonl",
        z_threshold=1.0,
        rank_by="ablation",
        perplexity_penalty=0.0,
        objective="gap",
        evaluate_perplexity=False,
    )
    result = method.run(tiny_llama, tiny_tokenizer, config, context(tmp_path, (root,)))
    table = json.loads(result.artifacts["head_scores.json"])
    ablation = torch.tensor(table["ablation"])
    z = (ablation - ablation.mean()) / ablation.std()
    expected = {(int(i) // 4, int(i) % 4) for i in torch.nonzero(z.flatten() > 1.0)}
    assert expected and {parse_head(h) for h in table["chosen"]} == expected
    assert result.metrics["heads_masked"] == float(len(expected))
    assert "perplexity_before" not in result.metrics and "loss_increase" not in table

    with pytest.raises(ValueError, match=r"^pairs_file:"):
        method.run(tiny_llama, tiny_tokenizer, config, context(tmp_path, (tmp_path / "x",)))


def test_default_shortlist_charges_perplexity(tiny_llama, tiny_tokenizer, tmp_path: Path) -> None:
    method = get_method("mask_biased_heads")
    config = method.config_class(
        pairs=PAIRS, top_k=2, shortlist_size=4, calibration_windows=2, evaluate_perplexity=False
    )
    assert config.rank_by == "shortlist" and config.perplexity_penalty > 0
    result = method.run(tiny_llama, tiny_tokenizer, config, context(tmp_path))
    table = json.loads(result.artifacts["head_scores.json"])
    gradient = torch.tensor(table["gradient"])
    ablation = torch.tensor([[math.nan if v is None else v for v in r] for r in table["ablation"]])
    added = torch.tensor(
        [[math.nan if v is None else v for v in r] for r in table["loss_increase"]]
    )
    shortlist = {(int(i) // 4, int(i) % 4) for i in gradient.flatten().argsort()[-4:]}
    measured = {(int(i) // 4, int(i) % 4) for i in torch.nonzero(~ablation.isnan().flatten())}
    assert measured == shortlist
    assert {(int(i) // 4, int(i) % 4) for i in torch.nonzero(~added.isnan().flatten())} == shortlist
    ranking = ablation - config.perplexity_penalty * added
    best = sorted(shortlist, key=lambda h: float(ranking[h]), reverse=True)[:2]
    assert [parse_head(h) for h in table["chosen"]] == best


def test_config_validation(tiny_llama) -> None:
    config_class = get_method("mask_biased_heads").config_class
    assert config_class().selection() == {"top_k": 3}
    with pytest.raises(ValidationError, match="z_threshold"):
        config_class(top_k=2, z_threshold=1.0)
    with pytest.raises(ValidationError, match="shortlist_size: 4 is below top_k 5"):
        config_class(top_k=5, shortlist_size=4)
    assert config_class(top_k=5, shortlist_size=4, rank_by="gradient").rank_by == "gradient"
    with pytest.raises(ValidationError, match="holdout_fraction"):
        config_class(holdout_fraction=1.0)
    with pytest.raises(ValidationError, match="pairs"):
        config_class(pairs=[{"stereo": "a", "anti": "b"}])
    with pytest.raises(ValidationError):
        config_class(top_k=2, unknown_key=1)
    with pytest.raises(ValueError, match=r"^top_k: 9 exceeds the model's 8 heads"):
        config_class(top_k=9).check_against(tiny_llama.config)
