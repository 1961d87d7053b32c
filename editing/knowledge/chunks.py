"""Many facts in one job, chunk by chunk: targets for a chunk, MEMIT's layer-by-layer solve
that keeps the keys of every earlier chunk, a forward-only check, and a second pass for the
facts that did not take.

Chunks bound the memory (one chunk's keys [C, in] and outputs [C, d] per layer; the keys of
earlier chunks only as their Gram matrix [in, in]) and let a job report progress and stop
between them. Yoon et al. (2024) measured that sequential smaller batches beat one large batch
at equal edits; here each chunk also sees the earlier chunks' edits when its targets are read.
A fact takes when its edit prompt gives the new target a higher mean token log-probability
than every ground truth (``efficacy``'s comparison); the second pass reads fresh targets for the
facts that did not, on the edited model, and solves for them alone while keeping the keys of
everything written so far.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from modelsurgery.editing.registry import MethodContext
from modelsurgery.evaluation.facts import answer_scores, prefers_new
from modelsurgery.models.adapters import ArchitectureAdapter

from .facts import Fact
from .gradients import RunningMoments, anchored, one_step_targets, site_gradients
from .keys import KeyWalk
from .targets import Targets

Solve = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
Optimise = Callable[[Sequence[Fact]], Targets]
Record = Callable[[int, torch.Tensor], None]


@dataclass(frozen=True)
class ChunkPlan:
    """How a job writes its facts: the edited layers, facts per chunk, the targets' kind, the
    fast targets' length as a multiple of the output norm, and whether failures get a second
    pass."""

    layers: list[int]
    chunk: int
    targets: Literal["fast", "optimised"]
    anchor: float
    second_pass: bool
    templates: tuple[str, ...]


@dataclass
class Written:
    """What the chunks wrote besides the weights: every fact's target loss and passes, and
    v*'s dtype when v* ran."""

    losses: list[float] = field(default_factory=list)
    passes: list[int] = field(default_factory=list)
    vstar_dtype: torch.dtype | None = None

    def metrics(self) -> dict[str, float]:
        n = len(self.losses)
        return {
            "v_loss": sum(self.losses) / n,
            "v_steps_used": sum(self.passes) / n,
            "second_pass_facts": float(sum(p > 1 for p in self.passes)),
        }


class _Targets:
    """A chunk's target output changes at the last edited layer [C, d]: fast (one gradient
    step, normalised with the statistics of every chunk so far, anchored) or optimised v*."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        adapter: ArchitectureAdapter,
        plan: ChunkPlan,
        optimise: Optimise,
    ) -> None:
        self.model, self.tokenizer, self.adapter, self.plan = model, tokenizer, adapter, plan
        self.optimise = optimise
        self.normaliser: RunningMoments | None = None
        self.dtype: torch.dtype | None = None

    def __call__(self, facts: Sequence[Fact]) -> tuple[torch.Tensor, list[float]]:
        if self.plan.targets == "optimised":
            found = self.optimise(facts)
            self.dtype = found.dtype
            return found.deltas, found.losses
        last = self.plan.layers[-1]
        (site,), losses = site_gradients(
            self.model,
            self.tokenizer,
            self.adapter,
            facts,
            [self.adapter.layer(last)],
            first_layer=last,
        )
        if self.normaliser is None:
            self.normaliser = RunningMoments(site.inputs.shape[1] + site.grads.shape[1])
        self.normaliser.update(torch.cat([site.inputs, site.grads], dim=1))
        steps = one_step_targets(site.inputs, site.grads, self.normaliser, lr=1.0, centre=False)
        return anchored(steps, site.outputs, self.plan.anchor), losses.tolist()


def _write(
    model: nn.Module,
    tokenizer: Any,
    adapter: ArchitectureAdapter,
    facts: Sequence[Fact],
    deltas: torch.Tensor,
    plan: ChunkPlan,
    solve: Solve,
    kept: dict[int, torch.Tensor],
) -> dict[int, torch.Tensor]:
    """MEMIT's layer-by-layer update for ``facts`` toward z = h + delta at the last layer,
    keeping the keys whose Gram matrices ``kept`` holds; returns each layer's keys [F, in]."""
    last = plan.layers[-1]
    walk = KeyWalk(
        model, tokenizer, adapter, facts, first_layer=plan.layers[0], templates=plan.templates
    )
    z: torch.Tensor | None = None
    keys_by_layer = {}
    for i, layer in enumerate(plan.layers):
        walk.advance(layer)
        keys, current = walk.keys(), walk.outputs(last)  # [F, in], [F, d]
        if z is None:
            z = current + deltas.to(current)  # [F, d]: the last layer's targets
        residuals = (z - current) / (len(plan.layers) - i)
        update = solve(layer, keys, residuals, kept.get(layer))
        projection = adapter.mlp_out(layer)
        with torch.no_grad():
            projection.weight.add_(update.to(projection.weight))
        keys_by_layer[layer] = keys
    return keys_by_layer


@torch.no_grad()
def taken(
    model: nn.Module, tokenizer: Any, adapter: ArchitectureAdapter, facts: Sequence[Fact]
) -> list[bool]:
    """Forward only: whether each fact's edit prompt now prefers its new target."""
    pairs: list[tuple[str, str]] = []
    for fact in facts:
        pairs += [(fact.text, fact.target), *((fact.text, t) for t in fact.true_targets)]
    answers = answer_scores(model, tokenizer, adapter, pairs)
    result, at = [], 0
    for fact in facts:
        n = 1 + len(fact.true_targets)
        result.append(prefers_new(answers[at], answers[at + 1 : at + n]) == 1.0)
        at += n
    return result


def _gram(keys: torch.Tensor) -> torch.Tensor:
    k = keys.double().cpu()
    return k.T @ k


def write_in_chunks(
    model: nn.Module,
    tokenizer: Any,
    adapter: ArchitectureAdapter,
    facts: Sequence[Fact],
    plan: ChunkPlan,
    solve: Solve,
    optimise: Optimise,
    record: Record,
    context: MethodContext,
) -> Written:
    """Every fact written, chunk by chunk (see the module docstring); each chunk's keys per
    layer [C, in] go to ``record`` (the lineage's preserved keys); cancellation checked and
    progress (facts done, total, seconds left at the rate so far) reported per chunk."""
    targets = _Targets(model, tokenizer, adapter, plan, optimise)
    kept: dict[int, torch.Tensor] = {}  # K_p^T K_p [in, in] of earlier chunks, per layer
    written = Written()
    start = time.perf_counter()
    for first in range(0, len(facts), plan.chunk):
        context.check_cancelled()
        chunk = facts[first : first + plan.chunk]
        deltas, losses = targets(chunk)
        keys = _write(model, tokenizer, adapter, chunk, deltas, plan, solve, kept)
        passes = [1] * len(chunk)
        if plan.second_pass:
            failed = [i for i, ok in enumerate(taken(model, tokenizer, adapter, chunk)) if not ok]
            if failed:
                ok = torch.ones(len(chunk), dtype=torch.bool)
                ok[failed] = False
                keep = {layer: kept.get(layer, 0) + _gram(keys[layer][ok]) for layer in plan.layers}
                again, _ = targets([chunk[i] for i in failed])
                _write(
                    model, tokenizer, adapter, [chunk[i] for i in failed], again, plan, solve, keep
                )
                for i in failed:
                    passes[i] = 2
        for layer in plan.layers:
            kept[layer] = kept.get(layer, 0) + _gram(keys[layer])
            record(layer, keys[layer])
        written.losses += losses
        written.passes += passes
        done = first + len(chunk)
        elapsed = time.perf_counter() - start
        context.progress(
            "memit: facts written",
            step=done,
            total=len(facts),
            eta_s=round(elapsed / done * (len(facts) - done), 1),
            second_pass=len(chunk) - passes.count(1),
        )
    written.vstar_dtype = targets.dtype
    return written
