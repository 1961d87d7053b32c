"""The contrast pairs a direction is fitted on and held out from, and the stereotype pairs the
ablation is judged on (gender datasets only)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from modelsurgery.editing.ablate_direction.config import AblateDirectionConfig
from modelsurgery.editing.contrast import TextPair, load_text_pairs
from modelsurgery.editing.contrast.pairs import split_held_out
from modelsurgery.editing.stereotypes.pairs import ContrastPair, load_crows_pairs, split_pairs
from modelsurgery.editing.stereotypes.winogender import load_winogender


@dataclass(frozen=True)
class ContrastData:
    """fit: pairs d is read from; heldout: pairs the projection figures are measured on;
    bias_heldout: CrowS-Pairs gender pairs for the stereotype share (None without a dataset)."""

    fit: list[TextPair]
    heldout: list[TextPair]
    bias_heldout: list[ContrastPair] | None


def _as_text_pairs(pairs: Sequence[ContrastPair]) -> list[TextPair]:
    return [TextPair(positive=p.stereo, negative=p.anti) for p in pairs]


def load_contrast(config: AblateDirectionConfig, data_roots: Sequence[Path]) -> ContrastData:
    if config.dataset is None:
        pairs = load_text_pairs(config.source(), data_roots)
        fit, held = split_held_out(pairs, config.holdout_fraction, config.seed)
        return ContrastData(fit, held, None)
    crows_fit, crows_held = split_pairs(
        load_crows_pairs(bias_types=["gender"]), config.holdout_fraction, config.seed
    )
    if config.dataset == "crows-pairs-gender":
        return ContrastData(_as_text_pairs(crows_fit), _as_text_pairs(crows_held), crows_held)
    gender = [TextPair(positive=p.female, negative=p.male) for p in load_winogender()]
    fit, held = split_held_out(gender, config.holdout_fraction, config.seed)
    return ContrastData(fit, held, crows_held)
