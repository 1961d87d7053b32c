"""Per-case results of a judgement (issue 31, ``eval --per-case``): one case per fact, lineage
fact and held-out pair, whose figures are exactly what the job-level metrics average, so a CI
log names the fact that broke."""

from __future__ import annotations

import pytest
from conftest import build_tiny_tokenizer, tiny_model
from test_lora import FACT

from modelsurgery.evaluation.judge import Reference, judge
from modelsurgery.evaluation.measure import JobMeasurements
from modelsurgery.evaluation.suite import Suite

FACTS = [
    FACT,
    {"prompt": "{} is in", "subject": "the city", "target_new": "red", "ground_truth": "blue"},
    {"prompt": "{} plays", "subject": "he", "target_new": "football", "ground_truth": "chess"},
]
PAIRS = [
    {"stereo": "he is a doctor", "anti": "she is a doctor"},
    {"stereo": "she is a nurse", "anti": "he is a nurse"},
    {"stereo": "he plays football", "anti": "she plays football"},
]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_cases_are_what_the_metrics_average() -> None:
    tokenizer = build_tiny_tokenizer()
    final, reference = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    suite = Suite.model_validate({"facts": FACTS[:2], "pairs": PAIRS})
    ancestor = Suite.model_validate({"facts": FACTS[2:]})
    judged = judge(
        final,
        Reference(reference),
        suite,
        [ancestor],
        measurements=JobMeasurements(tokenizer, None),
    )
    metrics, cases = judged.metrics, judged.cases
    assert [(c.suite, c.index) for c in cases] == [
        ("facts", 0),
        ("facts", 1),
        ("lineage_facts", 0),
        ("pairs", 0),
        ("pairs", 1),
        ("pairs", 2),
    ]
    facts, lineage, pairs = cases[:2], cases[2:3], cases[3:]
    assert facts[0].label == "she speaks -> japanese"
    for name in ("efficacy", "probability_gain"):
        assert mean([c.figures[name] for c in facts]) == pytest.approx(metrics[name])
    assert facts[0].figures["paraphrase"] == pytest.approx(metrics["paraphrase"])
    assert facts[0].figures["locality"] == pytest.approx(metrics["locality"])
    assert "locality" not in facts[1].figures  # that fact has no locality prompt
    assert all(c.passed == (c.figures["efficacy"] == 1.0) for c in facts + lineage)
    assert lineage[0].figures["efficacy"] == metrics["lineage_efficacy"]
    assert mean([c.figures["stereotyped"] for c in pairs]) == pytest.approx(
        metrics["stereotype_share"]
    )
    for name in ("bias_gap", "bias_gap_base"):
        assert mean([c.figures[name] for c in pairs]) == pytest.approx(metrics[name])
    assert all(c.passed == (c.figures["bias_gap"] <= 0) for c in pairs)
