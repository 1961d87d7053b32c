"""v*: the output change at the subject's last token that makes the model say the new target.

Optimised as in Meng et al.: a vector delta added at one site (ROME: the edit layer's MLP
output; MEMIT: the last edit layer's output) at the subject's last token of every prompt,
minimising the target NLL over the context-templated prompts + ``kl_factor`` * KL on
"{subject} is a" at the subject + a weight decay, with the norm clamped to ``clamp_factor``
times the original output's norm, stopping early once the loss is small, or (ENCORE's
most-probable early stopping, Gupta et al. 2025) once every answer token of every templated
prompt is already the model's most probable token: past that point further steps only lengthen
delta, which is what other keys pay for.

Many facts are optimised together (one delta per fact, losses summed, so the gradients and
Adam's per-element updates stay independent); the layers below the site run once per batch,
the model's parameters get no gradients, and logits are computed only where the loss reads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from modelsurgery.editing.registry import MethodContext
from modelsurgery.models.adapters import ArchitectureAdapter

from . import tokens as tk
from .facts import Fact
from .runner import (
    Aligned,
    CachedPrefix,
    align_lookups,
    logits_at,
    output_edit,
)
from .templates import KL_TEMPLATE, prefix_length, with_bare_first

Site = Literal["mlp_out", "layer"]


@dataclass(frozen=True)
class VStarParams:
    steps: int
    lr: float
    kl_factor: float
    weight_decay: float
    clamp_factor: float
    early_stop_loss: float
    stop_when_most_probable: bool = False


@dataclass
class VStarResult:
    """Per fact: ``deltas`` [F, d] (float32), the change of the site's output at the subject;
    ``losses`` and ``steps`` at the end. The output it is added to and the keys are computed on
    the model being edited (``keys.keys_and_outputs``), not here: v* may run on a copy in
    another dtype (``precision``)."""

    deltas: torch.Tensor
    losses: list[float]
    steps: list[int]


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """No weight gradients while optimising delta: backward only flows to the activations."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@dataclass
class _Batch:
    """Index bookkeeping in tail coordinates (column 0 = every row's subject token)."""

    aligned: Aligned
    site_fact: torch.Tensor
    bare_rows: torch.Tensor
    rewrite_rows: torch.Tensor
    rewrite_fact: torch.Tensor
    nll_rows: torch.Tensor
    nll_cols: torch.Tensor
    nll_tokens: torch.Tensor
    nll_seq: torch.Tensor
    kl_rows: torch.Tensor

    def to(self, device: torch.device) -> _Batch:
        fields = {k: v.to(device) if torch.is_tensor(v) else v for k, v in vars(self).items()}
        a = self.aligned
        fields["aligned"] = Aligned(
            a.ids.to(device), a.mask.to(device), a.positions.to(device), a.split, a.shift
        )
        return _Batch(**fields)


def _build_batch(tokenizer: Any, facts: Sequence[Fact], templates: tuple[str, ...]) -> _Batch:
    seqs: list[tk.Sequence] = []
    site_fact: list[int] = []
    bare_rows: list[int] = []
    rewrite_rows: list[int] = []
    kl_rows: list[int] = []
    for f_idx, fact in enumerate(facts):
        for t_idx, template in enumerate(templates):
            if t_idx == 0:
                bare_rows.append(len(seqs))
            rewrite_rows.append(len(seqs))
            site_fact.append(f_idx)
            seqs.append(
                tk.prompt_with_answer(
                    tokenizer,
                    template.replace("{}", fact.text),
                    fact.target,
                    fact.subject,
                    drop_last=True,
                    search_from=prefix_length(template),
                )
            )
    for f_idx, fact in enumerate(facts):
        kl_rows.append(len(seqs))
        site_fact.append(f_idx)
        seqs.append(tk.subject_prompt(tokenizer, KL_TEMPLATE.format(fact.subject), fact.subject))
    aligned = align_lookups(seqs, tk.pad_id_of(tokenizer))
    nll_rows, nll_cols, nll_tokens, nll_seq = [], [], [], []
    for r_idx, row in enumerate(rewrite_rows):
        seq = seqs[row]
        offset = aligned.shift[row] - aligned.split
        for pos, token in zip(seq.answer_positions, seq.answer, strict=True):
            if pos < seq.lookup:
                raise ValueError(f"answer of {seq.ids} starts before the subject's last token")
            nll_rows.append(row)
            nll_cols.append(pos + offset)
            nll_tokens.append(token)
            nll_seq.append(r_idx)
    long = torch.long
    return _Batch(
        aligned=aligned,
        site_fact=torch.tensor(site_fact, dtype=long),
        bare_rows=torch.tensor(bare_rows, dtype=long),
        rewrite_rows=torch.tensor(rewrite_rows, dtype=long),
        rewrite_fact=torch.tensor(site_fact[: len(rewrite_rows)], dtype=long),
        nll_rows=torch.tensor(nll_rows, dtype=long),
        nll_cols=torch.tensor(nll_cols, dtype=long),
        nll_tokens=torch.tensor(nll_tokens, dtype=long),
        nll_seq=torch.tensor(nll_seq, dtype=long),
        kl_rows=torch.tensor(kl_rows, dtype=long),
    )


@dataclass
class _Live:
    """The rows and loss entries of the facts still optimising, in the coordinates of the
    tail run on those rows only (``rows`` [R] into the aligned batch). A finished fact's delta
    is frozen, and its rows are independent of the others', so leaving them out of the forward
    changes nothing but the work: with early stopping, the cost follows each fact's own steps
    rather than the slowest fact's of the batch."""

    rows: torch.Tensor
    site_fact: torch.Tensor
    facts: torch.Tensor
    logit_rows: torch.Tensor
    logit_cols: torch.Tensor
    nll_tokens: torch.Tensor
    nll_seq: torch.Tensor

    @classmethod
    def of(cls, b: _Batch, done: torch.Tensor) -> _Live:
        keep_row = ~done[b.site_fact]  # (R,)
        rows = keep_row.nonzero().flatten()
        where = torch.cumsum(keep_row.long(), 0) - 1  # full row -> live row
        keep_nll = keep_row[b.nll_rows]
        facts = (~done).nonzero().flatten()
        kl_rows = b.kl_rows[facts]
        return cls(
            rows=rows,
            site_fact=b.site_fact[rows],
            facts=facts,
            logit_rows=torch.cat([where[b.nll_rows[keep_nll]], where[kl_rows]]),
            logit_cols=torch.cat([b.nll_cols[keep_nll], torch.zeros_like(kl_rows)]),
            nll_tokens=b.nll_tokens[keep_nll],
            nll_seq=b.nll_seq[keep_nll],
        )


def _group_mean(values: torch.Tensor, groups: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of ``values`` per group [n]; 0 for a group with no values."""
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, groups, values)
    counts = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(
        0, groups, torch.ones_like(values)
    )
    return sums / counts.clamp_min(1)


def _all_answers_on_top(logp: torch.Tensor, live: _Live, b: _Batch, n_facts: int) -> torch.Tensor:
    """[F] bool: every answer token of each live fact's rewrite prompts is the argmax there
    (``logp`` [N_live_tokens, vocab]; finished facts count as on top)."""
    missed = (logp.argmax(-1) != live.nll_tokens).float()  # (N_live_tokens,)
    per_seq = torch.zeros(b.rewrite_rows.numel(), device=logp.device).index_add(
        0, live.nll_seq, missed
    )
    per_fact = torch.zeros(n_facts, device=logp.device).index_add(0, b.rewrite_fact, per_seq)
    return per_fact == 0


def site_module(adapter: ArchitectureAdapter, layer: int, site: Site) -> nn.Module:
    return adapter.mlp_out(layer).module if site == "mlp_out" else adapter.layer(layer)


def optimize_deltas(
    model: nn.Module,
    tokenizer: Any,
    adapter: ArchitectureAdapter,
    facts: Sequence[Fact],
    *,
    layer: int,
    site: Site,
    params: VStarParams,
    templates: Sequence[str],
    context: MethodContext,
) -> VStarResult:
    """Optimise one delta per fact, all facts in one batch (callers chunk large lists)."""
    device = next(model.parameters()).device
    b = _build_batch(tokenizer, facts, with_bare_first(tuple(templates))).to(device)
    n_facts = len(facts)
    prefix = CachedPrefix(model, adapter, layer, b.aligned)
    delta = torch.zeros(n_facts, adapter.hidden_size, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=params.lr)
    state: dict[str, torch.Tensor] = {}
    done = torch.zeros(n_facts, dtype=torch.bool, device=device)
    live = _Live.of(b, done)

    def add_delta(out: torch.Tensor) -> torch.Tensor:
        if "target_init" not in state:
            bare = b.bare_rows.to(out.device)  # the site's layer may sit on another device
            state["target_init"] = out[bare, 0].detach().float().to(delta.device)
        shift = delta[live.site_fact, None].to(device=out.device, dtype=out.dtype)
        return torch.cat([out[:, :1] + shift, out[:, 1:]], 1)

    steps = [params.steps] * n_facts
    losses = torch.zeros(n_facts, device=device)
    with frozen_parameters(model), output_edit(site_module(adapter, layer, site), add_delta):
        for step in range(params.steps):
            context.check_cancelled()
            # 1. The tail on the rows of the facts still optimising only [R_live, T, d].
            hidden = prefix.tail_hidden(live.rows)
            logp = torch.log_softmax(
                logits_at(model, adapter, hidden, live.logit_rows, live.logit_cols), dim=-1
            )
            # 2. Per fact [F] (zero for finished facts): answer NLL, KL, weight decay.
            n_nll = live.nll_tokens.numel()
            token_nll = -logp[:n_nll].gather(1, live.nll_tokens[:, None]).squeeze(1)
            seq_nll = _group_mean(token_nll, live.nll_seq, b.rewrite_rows.numel())
            nll = _group_mean(seq_nll, b.rewrite_fact, n_facts)
            kl_logp = logp[n_nll:]
            if "kl_ref" not in state:
                state["kl_ref"] = kl_logp.detach()
            kl_live = (kl_logp.exp() * (kl_logp - state["kl_ref"][live.facts])).sum(-1)
            kl = torch.zeros(n_facts, device=device).index_add(0, live.facts, kl_live)
            init_norm = state["target_init"].norm(dim=-1)
            decay = params.weight_decay * delta.norm(dim=-1) / init_norm**2
            loss = nll + params.kl_factor * kl + decay
            # 3. Which facts reached the stop: small loss, or every answer token on top.
            losses = torch.where(done, losses, loss.detach())
            reached = loss.detach() < params.early_stop_loss
            if params.stop_when_most_probable:
                reached |= _all_answers_on_top(logp[:n_nll], live, b, n_facts)
            newly = (~done) & reached
            for i in newly.nonzero().flatten().tolist():
                steps[i] = step
            done |= newly
            context.progress(
                "v* optimisation",
                step=step + 1,
                total=params.steps,
                loss=float(losses.mean()),
                facts=n_facts,
                converged=int(done.sum()),
            )
            if bool(done.all()) or step == params.steps - 1:
                break
            # 4. One Adam step on the unfinished facts' deltas, then the clamp.
            optimizer.zero_grad(set_to_none=True)
            loss[~done].sum().backward()
            before = delta.detach().clone()
            optimizer.step()
            with torch.no_grad():
                delta[done] = before[done]
                max_norm = params.clamp_factor * init_norm
                norm = delta.norm(dim=-1).clamp_min(1e-12)
                delta.mul_(torch.where(norm > max_norm, max_norm / norm, 1.0)[:, None])
            if bool(newly.any()):
                live = _Live.of(b, done)
    return VStarResult(deltas=delta.detach().float(), losses=losses.tolist(), steps=steps)
