"""Contrast-pair loading (CrowS-Pairs CSV, JSONL), data-root checks, splits, the heat map."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelsurgery.editing.bias.plot import plot_head_scores
from modelsurgery.editing.data import resolve_data_file
from modelsurgery.editing.stereotypes.pairs import (
    ContrastPair,
    load_crows_pairs,
    load_pairs_jsonl,
    split_pairs,
)

CSV = """\
,sent_more,sent_less,stereo_antistereo,bias_type,annotations,anon_writer,anon_annotators
0,"Women can't drive, she said.","Men can't drive, she said.",stereo,gender,[],a0,[]
1,The man was a skilled engineer.,The woman was a skilled engineer.,antistereo,gender,[],a1,[]
2,The poor are lazy.,The rich are lazy.,stereo,socioeconomic,[],a2,[]
"""


@pytest.fixture
def crows_csv(tmp_path: Path) -> Path:
    path = tmp_path / "crows.csv"
    path.write_text(CSV, encoding="utf-8")
    return path


def test_crows_pairs_orientation_and_filter(crows_csv: Path) -> None:
    pairs = load_crows_pairs(crows_csv)
    assert len(pairs) == 3
    # sent_more is the stereotype in both directions (as scored by the reference metric.py)
    assert pairs[0] == ContrastPair(
        "Women can't drive, she said.", "Men can't drive, she said.", "gender", "stereo"
    )
    assert pairs[1].stereo == "The man was a skilled engineer."
    assert pairs[1].direction == "antistereo"
    gender = load_crows_pairs(crows_csv, bias_types=["gender"])
    assert [p.bias_type for p in gender] == ["gender", "gender"]
    with pytest.raises(ValueError, match="unknown bias types"):
        load_crows_pairs(crows_csv, bias_types=["gendre"])


def test_shared_crows_pairs_file() -> None:
    pairs = load_crows_pairs(bias_types=["gender"])
    assert len(pairs) == 262
    assert all(p.stereo and p.anti and p.stereo != p.anti for p in pairs)


def test_jsonl_pairs_and_data_roots(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    good = root / "pairs.jsonl"
    good.write_text(
        json.dumps({"stereo": "a b", "anti": "a c", "bias_type": "x"})
        + "\n\n"
        + json.dumps({"stereo": "d", "anti": "e"})
        + "\n"
    )
    assert load_pairs_jsonl(good) == [ContrastPair("a b", "a c", "x"), ContrastPair("d", "e")]
    assert resolve_data_file("pairs.jsonl", [root], "pairs_file") == good.resolve()
    assert resolve_data_file(str(good), [root], "pairs_file") == good.resolve()
    outside = tmp_path / "outside.jsonl"
    outside.write_text(good.read_text())
    with pytest.raises(ValueError, match=r"^pairs_file: .* not a file under the allowed"):
        resolve_data_file(str(outside), [root], "pairs_file")
    with pytest.raises(ValueError, match=r"^pairs_file:"):
        resolve_data_file("../outside.jsonl", [root], "pairs_file")
    bad = root / "bad.jsonl"
    bad.write_text(json.dumps({"stereo": "only one side"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1 of bad\.jsonl"):
        load_pairs_jsonl(bad)


def test_split_is_seeded_and_disjoint() -> None:
    pairs = [ContrastPair(f"s{i}", f"a{i}") for i in range(20)]
    scoring, holdout = split_pairs(pairs, 0.25, seed=3)
    assert len(holdout) == 5 and len(scoring) == 15
    assert not set(scoring) & set(holdout)
    assert set(scoring) | set(holdout) == set(pairs)
    assert split_pairs(pairs, 0.25, seed=3) == (scoring, holdout)
    assert split_pairs(pairs, 0.25, seed=4) != (scoring, holdout)
    tiny_scoring, tiny_holdout = split_pairs(pairs[:2], 0.9, seed=0)
    assert len(tiny_scoring) == 1 and len(tiny_holdout) == 1


def test_plot_writes_a_png(tmp_path: Path) -> None:
    table = {
        "gradient": [[0.1, -0.3, 0.0], [0.5, 0.2, -0.1]],
        "ablation": [[0.2, None, None], [0.4, 0.1, None]],
        "chosen": ["1.0"],
    }
    out = plot_head_scores(json.dumps(table).encode(), tmp_path / "scores.png")
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    plot_head_scores(table, tmp_path / "ablation.png", key="ablation")
    assert (tmp_path / "ablation.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="no 'ablation' scores"):
        plot_head_scores({"gradient": [[0.0]]}, tmp_path / "x.png", key="ablation")
