"""Judge a final model against a reference (the job's base version) on a suite and on every
ancestor's stored suite, batching each kind of work into one pass per model.

Definitions (``suite.DEFINITIONS_VERSION``; the fact metrics in ``evaluation.facts``):
- facts: ``efficacy`` / ``paraphrase`` / ``locality`` / ``probability_gain`` of the final model,
  locality against the reference model's argmaxes (stored with the suite, so a later judgement
  compares with the same reference).
- pairs: stereotype share and mean gap on the held-out pairs (editing.stereotypes.metrics).
- perplexity: WikiText-2 test, the job's protocol, final over reference.
- lineage: the same fact and pair metrics on all ancestors' stored suites, against their own
  stored references.
Scores come from the job's ``JobMeasurements``: the reference is state 0, the final model
``final_state``; what an operation already measured on either is not measured again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modelsurgery.editing.stereotypes.metrics import pair_gaps, summarize_gaps, tokenize_pairs
from modelsurgery.editing.stereotypes.pairs import ContrastPair

from .cases import Case, fact_cases, pair_cases
from .facts import fact_figures, locality_references
from .measure import JobMeasurements
from .metrics import FACTS, LINEAGE_PREFIX
from .suite import PairCase, Suite


@dataclass
class Reference:
    """The model a job started from. ``lock`` is entered once, around every reading of it:
    it guards a shared warm model, or puts a job's base back for the while."""

    model: nn.Module
    lock: AbstractContextManager[Any] | None = None

    def reading(self) -> AbstractContextManager[Any]:
        return self.lock if self.lock is not None else nullcontext()


@dataclass
class Judgement:
    metrics: dict[str, float]
    suite: Suite  # the judged suite with its references filled in: what the version stores
    # Each fact's and pair's own result (``evaluation.cases``), in suite order.
    cases: list[Case] = field(default_factory=list)


def _pair_gaps(model: nn.Module, tokenizer: Any, pairs: Sequence[PairCase]) -> torch.Tensor:
    contrast = [ContrastPair(p.stereo, p.anti) for p in pairs]
    return pair_gaps(model, tokenize_pairs(tokenizer, contrast))


@torch.no_grad()
def judge(
    final: nn.Module,
    reference: Reference,
    suite: Suite,
    lineage: Sequence[Suite] = (),
    *,
    measurements: JobMeasurements,
    final_state: int = 1,
) -> Judgement:
    """Metrics of ``final`` against ``reference`` (names as in ``evaluation.metrics``);
    perplexity when ``measurements`` has a protocol.

    ``suite.locality_reference`` is measured on the reference where missing (a job) and used
    as stored where present (a later ``eval``)."""
    started, measured_before = time.perf_counter(), measurements.seconds
    tokenizer = measurements.tokenizer
    metrics: dict[str, float] = {}
    cases: list[Case] = []
    ancestors_facts = [f for s in lineage for f in s.facts]
    references = list(suite.locality_reference)

    # Everything read from the reference, in one reading: a job's reference is its warm model
    # with the job's edits taken off for the while (``server.in_place``).
    before: list[Any] = []
    base_gaps = torch.empty(0)
    base_ppl = 0.0
    with reference.reading():
        if suite.facts:
            before = measurements.fact_scores(0, reference.model, suite.facts)
        if suite.pairs:
            base_gaps = _pair_gaps(reference.model, tokenizer, suite.pairs)
        if measurements.protocol is not None:
            base_ppl = measurements.perplexity(0, reference.model)
        base_parameters = sum(p.numel() for p in reference.model.parameters())

    if suite.facts and len(references) != len(suite.facts):
        references = locality_references(before)
    if suite.facts or ancestors_facts:
        after = measurements.fact_scores(final_state, final, [*suite.facts, *ancestors_facts])
        own, ancestors = after[: len(suite.facts)], after[len(suite.facts) :]
        if suite.facts:
            metrics.update(fact_figures(own, before=before, references=references))
            cases += fact_cases(FACTS, suite.facts, own, references, before)
        if ancestors_facts:
            stored = [r for s in lineage for r in _padded(s)]
            figures = fact_figures(ancestors, references=stored)
            cases += fact_cases(f"{LINEAGE_PREFIX}{FACTS}", ancestors_facts, ancestors, stored)
            metrics.update({f"lineage_{k}": v for k, v in figures.items()})
            metrics["lineage_facts"] = float(len(ancestors_facts))

    if suite.pairs:
        final_gaps = _pair_gaps(final, tokenizer, suite.pairs)
        final_pairs, base_pairs = summarize_gaps(final_gaps), summarize_gaps(base_gaps)
        for name in ("stereotype_share", "bias_gap"):
            metrics[name] = final_pairs[name]
            metrics[f"{name}_base"] = base_pairs[name]
        cases += pair_cases(suite.pairs, final_gaps.tolist(), base_gaps.tolist())
    ancestor_pairs = [p for s in lineage for p in s.pairs]
    if ancestor_pairs:
        metrics["lineage_stereotype_share"] = summarize_gaps(
            _pair_gaps(final, tokenizer, ancestor_pairs)
        )["stereotype_share"]
        metrics["lineage_pairs"] = float(len(ancestor_pairs))

    if measurements.protocol is not None:
        final_ppl = measurements.perplexity(final_state, final)
        metrics.update(perplexity=final_ppl, perplexity_base=base_ppl)
        metrics["perplexity_ratio"] = final_ppl / base_ppl

    metrics["parameter_ratio"] = sum(p.numel() for p in final.parameters()) / base_parameters
    # All of the job's evaluation: what the operations' figures measured, then this.
    metrics["eval_seconds"] = measured_before + time.perf_counter() - started
    judged = suite.model_copy(
        update={
            "locality_reference": references if suite.facts else [],
            "perplexity": measurements.protocol,
        }
    )
    return Judgement(metrics, judged, cases)


def _padded(suite: Suite) -> list[list[list[int]]]:
    """A stored suite's references, one (possibly empty) entry per fact."""
    refs = list(suite.locality_reference)
    return refs + [[] for _ in range(len(suite.facts) - len(refs))]
