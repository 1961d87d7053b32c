"""CounterFact-style fact metrics, one definition for operations, jobs and benchmarks.

- ``efficacy``: share of facts whose edit prompt gives target_new a higher mean token
  log-probability than ground_truth (ROME/EasyEdit's comparison, fair to multi-token answers);
  a fact without ground_truth counts its teacher-forced argmax accuracy on target_new instead.
- ``paraphrase``: the same on every rephrase prompt (absent when no fact has one).
- ``locality``: share of locality_ground_truth positions (teacher-forced) whose argmax token is
  unchanged by the edit (EasyEdit's neighbourhood check; absent when no fact has one).
- ``neighbourhood``: share of locality prompts on which the locality ground truth has a higher
  mean token log-probability than the fact's target_new (MEMIT's neighbourhood score); only when
  scored with ``neighbourhood=True`` (benchmarks), so a job's evaluation does not pay for it.
- ``probability_gain``: mean over facts of P(target_new) after minus before on the edit prompt,
  P = exp(mean token log-prob).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modelsurgery.editing.knowledge import tokens as tk
from modelsurgery.editing.knowledge.facts import Fact
from modelsurgery.editing.knowledge.runner import logits_at, run_base
from modelsurgery.models.adapters import ArchitectureAdapter


@dataclass
class Answer:
    mean_logp: float
    argmax: list[int]
    tokens: list[int]

    @property
    def accuracy(self) -> float:
        return sum(a == t for a, t in zip(self.argmax, self.tokens, strict=True)) / len(self.tokens)


@dataclass
class FactScores:
    new: Answer
    true: list[Answer]
    rephrase_new: list[Answer]
    rephrase_true: list[list[Answer]]
    locality: list[Answer]
    locality_new: list[Answer] = field(default_factory=list)


@torch.no_grad()
def answer_scores(
    model: nn.Module,
    tokenizer: Any,
    adapter: ArchitectureAdapter,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 32,
) -> list[Answer]:
    """Teacher-forced mean log-prob and argmax tokens of each (prompt, answer) pair."""
    device = next(model.parameters()).device
    seqs = [tk.prompt_with_answer(tokenizer, prompt, answer) for prompt, answer in pairs]
    out: list[Answer] = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        ids, mask = tk.pad_batch(chunk, tk.pad_id_of(tokenizer))
        hidden = run_base(model, ids.to(device), mask.to(device))
        rows = [r for r, s in enumerate(chunk) for _ in s.answer]
        cols = [p for s in chunk for p in s.answer_positions]
        logp = torch.log_softmax(
            logits_at(model, adapter, hidden, torch.tensor(rows), torch.tensor(cols)), dim=-1
        )
        offset = 0
        for seq in chunk:
            n = len(seq.answer)
            part = logp[offset : offset + n]
            token_lp = part.gather(1, torch.tensor(seq.answer, device=part.device)[:, None])
            out.append(Answer(float(token_lp.mean()), part.argmax(-1).tolist(), seq.answer))
            offset += n
    return out


def score_facts(
    model: nn.Module,
    tokenizer: Any,
    adapter: ArchitectureAdapter,
    facts: Sequence[Fact],
    *,
    neighbourhood: bool = False,
) -> list[FactScores]:
    """Every answer the metrics need, in one batched pass (with ``neighbourhood``, also
    target_new on each locality prompt)."""
    pairs: list[tuple[str, str]] = []
    layout: list[dict[str, Any]] = []
    for fact in facts:
        entry: dict[str, Any] = {"new": len(pairs)}
        pairs.append((fact.text, fact.target))
        entry["true"] = list(range(len(pairs), len(pairs) + len(fact.true_targets)))
        pairs += [(fact.text, t) for t in fact.true_targets]
        entry["rephrase"] = []
        for prompt in fact.rephrase_prompts:
            new_idx = len(pairs)
            pairs.append((prompt, fact.target))
            true_idx = list(range(len(pairs), len(pairs) + len(fact.true_targets)))
            pairs += [(prompt, t) for t in fact.true_targets]
            entry["rephrase"].append((new_idx, true_idx))
        entry["locality"] = list(range(len(pairs), len(pairs) + len(fact.locality_prompts)))
        pairs += list(zip(fact.locality_prompts, fact.locality_ground_truths, strict=True))
        entry["locality_new"] = []
        if neighbourhood:
            entry["locality_new"] = list(range(len(pairs), len(pairs) + len(fact.locality_prompts)))
            pairs += [(prompt, fact.target) for prompt in fact.locality_prompts]
        layout.append(entry)
    answers = answer_scores(model, tokenizer, adapter, pairs)
    return [
        FactScores(
            new=answers[e["new"]],
            true=[answers[i] for i in e["true"]],
            rephrase_new=[answers[n] for n, _ in e["rephrase"]],
            rephrase_true=[[answers[i] for i in t] for _, t in e["rephrase"]],
            locality=[answers[i] for i in e["locality"]],
            locality_new=[answers[i] for i in e["locality_new"]],
        )
        for e in layout
    ]


def prefers_new(new: Answer, true: list[Answer]) -> float:
    """1 when target_new beats every ground truth (no ground truth: its token accuracy)."""
    if not true:
        return new.accuracy
    return float(all(new.mean_logp > t.mean_logp for t in true))


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def locality_references(scores: Sequence[FactScores]) -> list[list[list[int]]]:
    """Each fact's locality answers as the reference model argmaxes them: what "unchanged"
    means for ``locality``, stored with a version's suite."""
    return [[answer.argmax for answer in fact.locality] for fact in scores]


def fact_figures(
    after: Sequence[FactScores],
    *,
    before: Sequence[FactScores] | None = None,
    references: Sequence[Sequence[Sequence[int]]] | None = None,
) -> dict[str, float]:
    """The metrics named in the module docstring, of ``after`` against the reference model:
    its scores ``before`` (``probability_gain``; locality references from them), or only the
    locality argmaxes it stored (``references``, one possibly empty entry per fact, for a
    later judgement); absent when nothing could be measured."""
    if references is None:
        references = locality_references(before or [])
    locality = [
        sum(x == y for x, y in zip(ref, answer.argmax, strict=True)) / len(ref)
        for fact, refs in zip(after, references, strict=True)
        if refs
        for ref, answer in zip(refs, fact.locality, strict=True)
    ]
    values: dict[str, float | None] = {
        "efficacy": _mean([prefers_new(a.new, a.true) for a in after]),
        "paraphrase": _mean(
            [
                prefers_new(new, true)
                for a in after
                for new, true in zip(a.rephrase_new, a.rephrase_true, strict=True)
            ]
        ),
        "locality": _mean(locality),
        "neighbourhood": _mean(
            [
                float(true.mean_logp > new.mean_logp)
                for a in after
                if a.locality_new
                for true, new in zip(a.locality, a.locality_new, strict=True)
            ]
        ),
    }
    if before is not None:
        values["probability_gain"] = _mean(
            [
                math.exp(a.new.mean_logp) - math.exp(b.new.mean_logp)
                for b, a in zip(before, after, strict=True)
            ]
        )
    return {name: value for name, value in values.items() if value is not None}
