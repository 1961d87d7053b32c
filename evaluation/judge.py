"""Judge a final model against a reference (the job's base version) on a suite and on every
ancestor's stored suite, batching each kind of work into one pass per model.

Definitions (``suite.DEFINITIONS_VERSION``):
- facts: ``efficacy`` / ``paraphrase`` = share of prompts (rephrases) where target_new's mean
  token log-prob beats every ground truth on the final model; ``locality`` = share of locality
  answer positions whose teacher-forced argmax equals the reference model's (stored with the
  suite, so a later judgement compares with the same reference); ``probability_gain`` = mean
  P(target_new) final minus reference.
- pairs: stereotype share and mean gap on the held-out pairs (editing.stereotypes.metrics).
- perplexity: WikiText-2 test, the protocol's tokens and window, final over reference.
- lineage: the same fact and pair metrics on all ancestors' stored suites, against their own
  stored references.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelsurgery.editing.knowledge.evaluate import FactScores, prefers_new, score_facts
from modelsurgery.editing.perplexity import wikitext_perplexity
from modelsurgery.editing.stereotypes.metrics import bias_metrics, tokenize_pairs
from modelsurgery.editing.stereotypes.pairs import ContrastPair
from modelsurgery.models.adapters import get_adapter

from .suite import PairCase, PerplexityProtocol, Suite


@dataclass
class Reference:
    """The model a job started from; ``lock`` guards a shared warm model while it is read."""

    model: nn.Module
    digest: str
    lock: AbstractContextManager[Any] | None = None

    def reading(self) -> AbstractContextManager[Any]:
        return self.lock if self.lock is not None else nullcontext()


@dataclass
class Judgement:
    metrics: dict[str, float]
    suite: Suite  # the judged suite with its references filled in: what the version stores


class PerplexityCache:
    """Perplexities of reference models by (digest, protocol), kept on disk: the base of a
    CI patch is the same model job after job."""

    def __init__(self, root: Path | None) -> None:
        self.root = root

    def _path(self, digest: str, protocol: PerplexityProtocol) -> Path | None:
        if self.root is None:
            return None
        name = f"{digest}-{protocol.tokens}-{protocol.window}-{protocol.dataset_sha256[:16]}.json"
        return self.root / "evaluation" / "perplexity" / name

    def get(self, digest: str, protocol: PerplexityProtocol, compute: Callable[[], float]) -> float:
        path = self._path(digest, protocol)
        if path is not None and path.is_file():
            return float(json.loads(path.read_text())["perplexity"])
        value = compute()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"perplexity": value}))
            tmp.replace(path)
        return value


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fact_figures(
    scores: Sequence[FactScores], references: Sequence[Sequence[Sequence[int]]]
) -> dict[str, float | None]:
    """efficacy, paraphrase, locality of final-model scores against stored references."""
    locality = [
        sum(x == y for x, y in zip(ref, answer.argmax, strict=True)) / len(ref)
        for fact, refs in zip(scores, references, strict=True)
        if refs
        for ref, answer in zip(refs, fact.locality, strict=True)
    ]
    return {
        "efficacy": _mean([prefers_new(s.new, s.true) for s in scores]),
        "paraphrase": _mean(
            [
                prefers_new(new, true)
                for s in scores
                for new, true in zip(s.rephrase_new, s.rephrase_true, strict=True)
            ]
        ),
        "locality": _mean(locality),
    }


def _pair_figures(model: nn.Module, tokenizer: Any, pairs: Sequence[PairCase]) -> dict[str, float]:
    contrast = [ContrastPair(p.stereo, p.anti) for p in pairs]
    return bias_metrics(model, tokenize_pairs(tokenizer, contrast))


def _perplexity(model: nn.Module, tokenizer: Any, protocol: PerplexityProtocol) -> float:
    return wikitext_perplexity(model, tokenizer, max_tokens=protocol.tokens, window=protocol.window)


@torch.no_grad()
def judge(
    final: nn.Module,
    reference: Reference,
    tokenizer: Any,
    suite: Suite,
    lineage: Sequence[Suite] = (),
    *,
    perplexity: PerplexityProtocol | None = None,
    base_perplexity: float | None = None,
    final_perplexity: float | None = None,
    cache: PerplexityCache | None = None,
) -> Judgement:
    """Metrics of ``final`` against ``reference`` (names as in ``evaluation.metrics``).

    ``suite.locality_reference`` is measured on the reference where missing (a job) and used
    as stored where present (a later ``eval``). ``base_perplexity`` / ``final_perplexity``:
    already measured with this protocol (by the job's first / last operation), not again.
    """
    started = time.perf_counter()
    cache = cache or PerplexityCache(None)
    adapter = get_adapter(final)
    metrics: dict[str, float] = {}
    ancestors_facts = [f for s in lineage for f in s.facts]
    references = list(suite.locality_reference)

    if suite.facts:
        with reference.reading():
            before = score_facts(
                reference.model, tokenizer, get_adapter(reference.model), suite.facts
            )
        if len(references) != len(suite.facts):
            references = [[answer.argmax for answer in s.locality] for s in before]
    if suite.facts or ancestors_facts:
        after = score_facts(final, tokenizer, adapter, [*suite.facts, *ancestors_facts])
        own, ancestors = after[: len(suite.facts)], after[len(suite.facts) :]
        if suite.facts:
            figures = _fact_figures(own, references)
            gains = [
                math.exp(a.new.mean_logp) - math.exp(b.new.mean_logp)
                for b, a in zip(before, own, strict=True)
            ]
            figures["probability_gain"] = _mean(gains)
            metrics.update({k: v for k, v in figures.items() if v is not None})
        if ancestors_facts:
            stored = [r for s in lineage for r in _padded(s)]
            figures = _fact_figures(ancestors, stored)
            metrics.update({f"lineage_{k}": v for k, v in figures.items() if v is not None})
            metrics["lineage_facts"] = float(len(ancestors_facts))

    if suite.pairs:
        final_pairs = _pair_figures(final, tokenizer, suite.pairs)
        with reference.reading():
            base_pairs = _pair_figures(reference.model, tokenizer, suite.pairs)
        for name in ("stereotype_share", "bias_gap"):
            metrics[name] = final_pairs[name]
            metrics[f"{name}_base"] = base_pairs[name]
    ancestor_pairs = [p for s in lineage for p in s.pairs]
    if ancestor_pairs:
        metrics["lineage_stereotype_share"] = _pair_figures(final, tokenizer, ancestor_pairs)[
            "stereotype_share"
        ]
        metrics["lineage_pairs"] = float(len(ancestor_pairs))

    if perplexity is not None:
        with reference.reading():
            base_ppl = base_perplexity or cache.get(
                reference.digest,
                perplexity,
                lambda: _perplexity(reference.model, tokenizer, perplexity),
            )
        final_ppl = final_perplexity or _perplexity(final, tokenizer, perplexity)
        metrics.update(perplexity=final_ppl, perplexity_base=base_ppl)
        metrics["perplexity_ratio"] = final_ppl / base_ppl

    with reference.reading():
        base_parameters = sum(p.numel() for p in reference.model.parameters())
    metrics["parameter_ratio"] = sum(p.numel() for p in final.parameters()) / base_parameters
    metrics["eval_seconds"] = time.perf_counter() - started
    judged = suite.model_copy(
        update={"locality_reference": references if suite.facts else [], "perplexity": perplexity}
    )
    return Judgement(metrics, judged)


def _padded(suite: Suite) -> list[list[list[int]]]:
    """A stored suite's references, one (possibly empty) entry per fact."""
    refs = list(suite.locality_reference)
    return refs + [[] for _ in range(len(suite.facts) - len(refs))]
