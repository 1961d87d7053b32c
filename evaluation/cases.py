"""Each fact's and pair's own result in a judgement (``eval --per-case``), so a CI log shows
which fact broke instead of only the mean that fell. The figures are the per-case values the
job-level metrics average (``evaluation.facts``, ``editing.stereotypes.metrics``), under the
same names."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from modelsurgery.editing.knowledge.facts import Fact

from .facts import FactScores, prefers_new
from .suite import PairCase

LABEL_CHARS = 120


@dataclass(frozen=True)
class Case:
    """``suite``: ``facts``, ``lineage_facts`` or ``pairs``; ``index`` in that suite; a short
    label; ``passed``: the fact takes (efficacy 1), the pair is not stereotyped."""

    suite: str
    index: int
    label: str
    passed: bool
    figures: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _short(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 3] + "..."


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def fact_cases(
    suite: str,
    facts: Sequence[Fact],
    after: Sequence[FactScores],
    references: Sequence[Sequence[Sequence[int]]],
    before: Sequence[FactScores] | None = None,
) -> list[Case]:
    """One case per fact: its efficacy (0/1), paraphrase and locality shares, and with
    ``before`` its probability gain, as ``fact_figures`` counts them."""
    cases = []
    for index, (fact, scores, refs) in enumerate(zip(facts, after, references, strict=True)):
        figures: dict[str, float | None] = {
            "efficacy": prefers_new(scores.new, scores.true),
            "paraphrase": _mean(
                [
                    prefers_new(new, true)
                    for new, true in zip(scores.rephrase_new, scores.rephrase_true, strict=True)
                ]
            ),
            "locality": _mean(
                [
                    sum(x == y for x, y in zip(ref, answer.argmax, strict=True)) / len(ref)
                    for ref, answer in zip(refs, scores.locality, strict=True)
                ]
            ),
        }
        if before is not None:
            figures["probability_gain"] = math.exp(scores.new.mean_logp) - math.exp(
                before[index].new.mean_logp
            )
        kept = {name: value for name, value in figures.items() if value is not None}
        label = _short(f"{fact.text} -> {fact.target.strip()}")
        cases.append(Case(suite, index, label, kept["efficacy"] == 1.0, kept))
    return cases


def pair_cases(
    pairs: Sequence[PairCase], gaps_after: Sequence[float], gaps_before: Sequence[float]
) -> list[Case]:
    """One case per held-out pair: its log-likelihood gap (stereo minus anti, nats) on the
    judged model and on the reference; it passes when the stereotype is not more likely."""
    return [
        Case(
            "pairs",
            index,
            _short(f"{pair.stereo} / {pair.anti}"),
            after <= 0.0,
            {"bias_gap": after, "bias_gap_base": before, "stereotyped": float(after > 0.0)},
        )
        for index, (pair, after, before) in enumerate(
            zip(pairs, gaps_after, gaps_before, strict=True)
        )
    ]
