"""v* for many facts: batches of facts of similar length, optimised in the optimisation dtype
(``precision``), spread over the context's fan-out.

Every step of a batch runs each row's tail (the tokens from the subject's last token on)
through the upper layers, padded to the batch's longest tail. Facts in file order padded a
16-fact batch to 52.5 tail tokens per fact where 29 were real (CounterFact dev cases
9000-9063, six templates + the KL prompt); batches cut from the facts sorted by tail length
waste almost none. A batch's result depends only on its facts, so the batches are the same
whatever runs them, and results are put back in the facts' order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from modelsurgery.editing.registry import DtypeSetting, MethodContext
from modelsurgery.models.adapters import get_adapter

from . import tokens as tk
from .facts import Fact
from .precision import optimisation_dtype, optimisation_precision
from .vstar import Site, VStarParams, optimize_deltas


@dataclass(frozen=True)
class VStarBatch:
    """One fan-out payload: the facts of one batch and how to optimise them."""

    facts: tuple[Fact, ...]
    layer: int
    site: Site
    params: VStarParams
    templates: tuple[str, ...]
    dtype: torch.dtype


@dataclass
class Targets:
    """Per fact, in the facts' order: the optimised output change [F, d], final loss, steps."""

    deltas: torch.Tensor
    losses: list[float]
    steps: list[int]
    dtype: torch.dtype


def tail_length(tokenizer: object, fact: Fact) -> int:
    """Tokens of the bare prompt from the subject's last token on, answer included (the
    context templates only add tokens before the subject, so this is every row's tail)."""
    seq = tk.prompt_with_answer(tokenizer, fact.text, fact.target, fact.subject, drop_last=True)
    return len(seq.ids) - seq.lookup


def length_batches(tokenizer: object, facts: Sequence[Fact], size: int) -> list[list[int]]:
    """Fact indices in batches of ``size``, cut from the facts sorted by tail length (ties
    keep their order, so the batches are a function of the facts alone)."""
    order = sorted(range(len(facts)), key=lambda i: tail_length(tokenizer, facts[i]))
    return [order[start : start + size] for start in range(0, len(order), size)]


def optimise_batch(
    model: nn.Module, tokenizer: object, batch: VStarBatch, context: MethodContext
) -> tuple[torch.Tensor, list[float], list[int]]:
    """The fan-out task: one batch's deltas [B, d] (float32, on CPU), losses and steps."""
    with optimisation_precision(model, batch.dtype, batch.layer, context.set_aside):
        result = optimize_deltas(
            model,
            tokenizer,
            get_adapter(model),
            batch.facts,
            layer=batch.layer,
            site=batch.site,
            params=batch.params,
            templates=batch.templates,
            context=context,
        )
    return result.deltas.cpu(), result.losses, result.steps


def optimise_targets(
    model: nn.Module,
    tokenizer: object,
    facts: Sequence[Fact],
    *,
    layer: int,
    site: Site,
    params: VStarParams,
    templates: Sequence[str],
    batch_size: int,
    dtype: DtypeSetting,
    context: MethodContext,
) -> Targets:
    """Deltas of every fact, batch by batch over ``context.fan_out``; one progress event per
    finished batch, cancellation checked between batches."""
    resolved = optimisation_dtype(model, dtype)
    groups = length_batches(tokenizer, facts, batch_size)
    payloads = [
        VStarBatch(tuple(facts[i] for i in group), layer, site, params, tuple(templates), resolved)
        for group in groups
    ]
    hidden = get_adapter(model).hidden_size
    deltas = torch.zeros(len(facts), hidden)
    losses, steps = [0.0] * len(facts), [0] * len(facts)
    done = 0
    for index, (batch_deltas, batch_losses, batch_steps) in context.fan_out(
        optimise_batch, model, tokenizer, payloads, context
    ):
        group = groups[index]
        deltas[group] = batch_deltas.float()
        for slot, fact_index in enumerate(group):
            losses[fact_index] = batch_losses[slot]
            steps[fact_index] = batch_steps[slot]
        done += len(group)
        context.progress("v* targets", step=done, total=len(facts), batches=len(groups))
        context.check_cancelled()
    return Targets(deltas.to(next(model.parameters()).device), losses, steps, resolved)
