"""Contrast pairs for bias scoring: CrowS-Pairs, user JSONL, seeded scoring/held-out splits.

Orientation convention (CrowS-Pairs, Nangia et al. 2020): ``sent_more`` is the more
stereotypical sentence of *every* row. The ``stereo_antistereo`` column says whether
``sent_more`` expresses a stereotype about the disadvantaged group ("stereo") or ``sent_less``
violates one ("antistereo", e.g. "The man was highly skilled in CAD engineering" vs "The woman
..."). The reference ``metric.py`` reads antistereo rows as (sent1=sent_less, sent2=sent_more)
and then counts ``sent2 > sent1`` for them, so its score is the share of pairs where
``sent_more`` wins in both directions. We therefore map ``stereo := sent_more``,
``anti := sent_less`` for every row and keep the direction only as metadata.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from modelsurgery.editing.data import (
    CROWS_PAIRS_PATH,
    read_jsonl,
    shared_data_path,
    split_indices,
)


@dataclass(frozen=True)
class ContrastPair:
    """A stereotypical sentence and its minimally different anti-stereotypical twin."""

    stereo: str
    anti: str
    bias_type: str = ""
    direction: str = "stereo"


def load_crows_pairs(
    path: Path | None = None, bias_types: Sequence[str] | None = None
) -> list[ContrastPair]:
    """CrowS-Pairs rows as pairs (see the module docstring), optionally only some bias types."""
    csv_path = path or shared_data_path(CROWS_PAIRS_PATH)
    with csv_path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = {"sent_more", "sent_less", "stereo_antistereo", "bias_type"} - set(
        rows[0] if rows else {}
    )
    if missing:
        raise ValueError(f"{csv_path.name} lacks CrowS-Pairs columns {sorted(missing)}")
    pairs = [
        ContrastPair(
            stereo=row["sent_more"],
            anti=row["sent_less"],
            bias_type=row["bias_type"],
            direction=row["stereo_antistereo"],
        )
        for row in rows
    ]
    if bias_types is None:
        return pairs
    known = {p.bias_type for p in pairs}
    unknown = sorted(set(bias_types) - known)
    if unknown:
        raise ValueError(f"unknown bias types {unknown}; CrowS-Pairs has {sorted(known)}")
    wanted = set(bias_types)
    return [p for p in pairs if p.bias_type in wanted]


def load_pairs_jsonl(path: Path) -> list[ContrastPair]:
    """One JSON object per line: ``{"stereo": ..., "anti": ..., "bias_type": optional}``."""
    pairs = []
    for lineno, row in read_jsonl(path, "pairs_file"):
        if not isinstance(row, dict) or not row.get("stereo") or not row.get("anti"):
            raise ValueError(
                f"pairs_file: line {lineno} of {path.name}: expected an object with 'stereo' "
                "and 'anti'"
            )
        pairs.append(ContrastPair(row["stereo"], row["anti"], str(row.get("bias_type", ""))))
    return pairs


def split_pairs(
    pairs: Sequence[ContrastPair], holdout_fraction: float, seed: int
) -> tuple[list[ContrastPair], list[ContrastPair]]:
    """Seeded disjoint (scoring, held-out) split; both sides get at least one pair."""
    if len(pairs) < 2:
        raise ValueError(f"need at least 2 pairs to split, got {len(pairs)}")
    scoring, holdout = split_indices(len(pairs), holdout_fraction, seed)
    return [pairs[i] for i in scoring], [pairs[i] for i in holdout]
