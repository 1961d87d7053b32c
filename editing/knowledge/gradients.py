"""Fast targets: each fact's output change from one forward and one backward pass, instead of
an optimised v* (25 Adam steps per fact, nearly all of a large MEMIT job's time).

UltraEdit (Gu et al., XiaojieGu/UltraEdit) reads, per fact, the edited module's input k and the
gradient g of the target's NLL with respect to its output, normalises both with running
("lifelong") statistics over every fact seen so far, and asks for the output change one
gradient step on the weights would make: a step Delta W = -eta g_hat k_hat^T moves the
output by r = -eta ||k_hat||^2 g_hat. Here g is read at the last edited layer's output (MEMIT's
site: the residual the layer-by-layer updates share out) at the subject's last token of the bare
prompt, the NLL is the mean over the target's tokens, and the later layers run once forward and
once backward with no weight gradients. ``anchored`` then sets each target's length to a fixed
multiple of that output's norm (norm anchoring, as NAS caps targets against a reference norm):
the one-step length depends on eta and the gradient's scale, which differ between models and
facts; the output norm is what v*'s clamp is measured against too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelsurgery.models.adapters import ArchitectureAdapter

from . import tokens as tk
from .facts import Fact
from .runner import at_positions, hidden_entering, logits_at, run_base, suffix_only
from .vstar import frozen_parameters


class RunningMoments:
    """UltraEdit's lifelong normaliser: per-dimension mean and standard deviation of every row
    seen so far (Chan et al.'s parallel update), so a later chunk's facts are normalised with
    the earlier chunks' statistics too."""

    def __init__(self, width: int) -> None:
        self.count = 0
        self.mean = torch.zeros(width, dtype=torch.float64)
        self.m2 = torch.zeros(width, dtype=torch.float64)

    def update(self, rows: torch.Tensor) -> None:
        x = rows.detach().double().cpu()
        n = x.shape[0]
        total = self.count + n
        delta = x.mean(0) - self.mean
        self.mean += delta * n / total
        self.m2 += ((x - x.mean(0)) ** 2).sum(0) + delta**2 * self.count * n / total
        self.count = total

    def normalise(self, rows: torch.Tensor, *, centre: bool = True) -> torch.Tensor:
        """(rows - mean) / std per dimension (UltraEdit's), or rows / std without ``centre``;
        std is 1 until two rows were seen."""
        std = (self.m2 / (self.count - 1)).sqrt() if self.count > 1 else torch.ones_like(self.m2)
        eps = torch.finfo(torch.float32).eps
        shifted = rows.double().cpu() - (self.mean if centre else 0.0)
        return (shifted / (std + eps)).to(rows)


@dataclass
class SiteGradients:
    """Per fact, at one site (a module) at the subject's last token of the bare prompt: the
    site's input [F, in] and output [F, d], and the gradient [F, d] of the target's mean token
    NLL with respect to that output (float32)."""

    inputs: torch.Tensor
    outputs: torch.Tensor
    grads: torch.Tensor


def site_gradients(
    model: nn.Module,
    tokenizer: Any,
    adapter: ArchitectureAdapter,
    facts: Sequence[Fact],
    sites: Sequence[nn.Module],
    *,
    first_layer: int,
    batch_facts: int = 32,
) -> tuple[list[SiteGradients], torch.Tensor]:
    """One forward (layers below ``first_layer`` without a graph) and one backward (from the
    logits at the answer positions down to ``first_layer``) per batch of facts; returns each
    site's gradients and every fact's NLL [F]. No weight gets a gradient."""
    device = next(model.parameters()).device
    found: list[list[list[torch.Tensor]]] = [[[], [], []] for _ in sites]
    losses = []
    for start in range(0, len(facts), batch_facts):
        chunk = facts[start : start + batch_facts]
        seqs = [
            tk.prompt_with_answer(tokenizer, f.text, f.target, f.subject, drop_last=True)
            for f in chunk
        ]
        ids, mask = (t.to(device) for t in tk.pad_batch(seqs, tk.pad_id_of(tokenizer)))
        at = torch.arange(len(seqs), device=device)
        lookups = torch.tensor([s.lookup for s in seqs], device=device)
        # 1. Hidden states entering ``first_layer`` [B, T, d], no graph below it.
        entering = hidden_entering(model, adapter, first_layer, ids, mask)
        # 2. Each site's input and output at the lookups; outputs keep their gradient.
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        def keep(module: nn.Module, args: tuple[Any, ...], output: Any, seen=seen) -> None:
            out = output[0] if isinstance(output, tuple) else output
            out.retain_grad()
            seen.append((args[0].detach(), out))

        handles = [site.register_forward_hook(keep) for site in sites]
        rows = torch.tensor([r for r, s in enumerate(seqs) for _ in s.answer], device=device)
        cols = torch.tensor([p for s in seqs for p in s.answer_positions], device=device)
        answers = torch.tensor([t for s in seqs for t in s.answer], device=device)
        try:
            with (
                frozen_parameters(model),
                torch.enable_grad(),
                suffix_only(adapter, first_layer, entering.requires_grad_(True)),
            ):
                # 3. Logits only where answers are read [A, vocab]; NLL per answer token [A].
                logits = logits_at(model, adapter, run_base(model, ids, mask), rows, cols)
                token_nll = torch.nn.functional.cross_entropy(logits, answers, reduction="none")
                # 4. Mean NLL per fact [B]; their sum keeps each fact's gradient its own.
                counts = torch.tensor([len(s.answer) for s in seqs], device=device)
                per_fact = torch.zeros(len(seqs), device=device).index_add(0, rows, token_nll)
                per_fact = per_fact / counts
                per_fact.sum().backward()
        finally:
            for handle in handles:
                handle.remove()
        # 5. Each site's output and gradient at the lookups [B, d].
        for slot, (inputs, out) in enumerate(seen):
            found[slot][0].append(at_positions(inputs, at, lookups).float())
            found[slot][1].append(at_positions(out.detach(), at, lookups).float())
            found[slot][2].append(at_positions(out.grad, at, lookups).float())
        losses.append(per_fact.detach().float())
    return [SiteGradients(*(torch.cat(part) for part in site)) for site in found], torch.cat(losses)


def one_step_targets(
    keys: torch.Tensor,
    grads: torch.Tensor,
    normaliser: RunningMoments,
    lr: float,
    *,
    centre: bool = True,
) -> torch.Tensor:
    """UltraEdit's target output changes r = -lr ||k_hat||^2 g_hat [F, d], [k, g] normalised
    by the running statistics (the caller adds these facts to them first, as UltraEdit
    updates its normaliser while caching a batch, before solving it). Without ``centre`` the
    rows are only divided by the deviations: -g / std is a descent direction for every fact,
    while (g - mean) / std need not be (it makes a fact's step depend on the others' mean
    gradient; with one fact it is zero)."""
    # 1. z = [k, g] [F, in + d], normalised per dimension.
    joined = torch.cat([keys.float(), grads.float()], dim=1)
    z_hat = normaliser.normalise(joined, centre=centre)
    k_hat, g_hat = z_hat.split([keys.shape[1], grads.shape[1]], dim=1)
    # 2. One weight step's output change, [F, d].
    return -lr * (k_hat * k_hat).sum(1, keepdim=True) * g_hat


def anchored(steps: torch.Tensor, outputs: torch.Tensor, anchor: float) -> torch.Tensor:
    """``steps`` [F, d] rescaled to ``anchor`` times each fact's output norm ||h|| (the
    direction kept, the length anchored)."""
    length = steps.norm(dim=1, keepdim=True).clamp_min(torch.finfo(steps.dtype).tiny)
    return steps * (anchor * outputs.norm(dim=1, keepdim=True) / length)
