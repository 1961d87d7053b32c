"""Every generic figure of one job, each measured once.

A job's models are numbered by state: 0 is the job's base, ``i + 1`` the model right after
operation ``i``. An operation's own ``op<i>.perplexity_*`` and fact figures compare states
``i`` and ``i + 1``; the job's unprefixed figures compare state 0 with the last state. Scores
are kept per state, so a figure both ask for is one measurement: in a one-operation job
``op0.X`` is ``X``, and a MEMIT job scores its facts twice (before and after), not four times.
All perplexities use the job's one protocol.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import nn

from modelsurgery.editing.knowledge.facts import Fact
from modelsurgery.models.adapters import get_adapter

from .facts import FactScores, fact_figures, score_facts
from .metrics import FACTS, OPERATION_PERPLEXITY_METRICS
from .perplexity import PerplexityCache, wikitext_perplexity
from .suite import PerplexityProtocol

T = TypeVar("T")


class JobMeasurements:
    """Scores of a job's model states on WikiText-2 and on facts, computed on first request.

    ``base_digest`` keys the base's perplexity in the on-disk ``cache`` (a CI patch starts
    from the same model job after job); ``seconds`` is the time spent measuring so far."""

    def __init__(
        self,
        tokenizer: Any,
        protocol: PerplexityProtocol | None,
        *,
        base_digest: str = "",
        cache: PerplexityCache | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.protocol = protocol
        self.base_digest = base_digest
        self.cache = cache or PerplexityCache(None)
        self._perplexity: dict[int, float] = {}
        self._facts: dict[tuple[int, str], FactScores] = {}
        self.seconds = 0.0

    def _timed(self, work: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return work()
        finally:
            self.seconds += time.perf_counter() - started

    def perplexity(self, state: int, model: nn.Module) -> float:
        if self.protocol is None:
            raise ValueError("this job measures no perplexity (no gate or operation asks)")
        if state not in self._perplexity:
            protocol = self.protocol

            def compute() -> float:
                return wikitext_perplexity(
                    model, self.tokenizer, max_tokens=protocol.tokens, window=protocol.window
                )

            if state == 0 and self.base_digest:
                value = self._timed(lambda: self.cache.get(self.base_digest, protocol, compute))
            else:
                value = self._timed(compute)
            self._perplexity[state] = value
        return self._perplexity[state]

    def fact_scores(self, state: int, model: nn.Module, facts: Sequence[Fact]) -> list[FactScores]:
        """Scores of ``facts`` on the model in ``state``, one batched pass over those not yet
        scored there."""
        keys = [fact.model_dump_json() for fact in facts]
        missing = {k: f for k, f in zip(keys, facts, strict=True) if (state, k) not in self._facts}
        if missing:
            scores = self._timed(
                lambda: score_facts(
                    model, self.tokenizer, get_adapter(model), list(missing.values())
                )
            )
            self._facts.update({(state, k): s for k, s in zip(missing, scores, strict=True)})
        return [self._facts[(state, k)] for k in keys]

    def before_operation(
        self, index: int, model: nn.Module, measures: frozenset[str], facts: Sequence[Fact]
    ) -> None:
        """Measure state ``index`` (the model operation ``index`` is about to change)."""
        if "perplexity" in measures:
            self.perplexity(index, model)
        if FACTS in measures:
            self.fact_scores(index, model, facts)

    def operation_figures(
        self, index: int, model: nn.Module, measures: frozenset[str], facts: Sequence[Fact]
    ) -> dict[str, float]:
        """Operation ``index``'s generic figures: state ``index + 1`` (``model``, now changed)
        against state ``index`` (measured by ``before_operation``)."""
        figures: dict[str, float] = {}
        if "perplexity" in measures:
            before, after = self._perplexity[index], self.perplexity(index + 1, model)
            figures.update(
                zip(OPERATION_PERPLEXITY_METRICS, (before, after, after / before), strict=True)
            )
        if FACTS in measures and facts:
            before_scores = [self._facts[(index, f.model_dump_json())] for f in facts]
            after_scores = self.fact_scores(index + 1, model, facts)
            figures.update(fact_figures(after_scores, before=before_scores))
        return figures
