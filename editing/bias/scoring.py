"""Per-head bias scores (Yang et al. 2023, "Bias A-head?"): how much each attention head
drives a bias objective (see ``BiasObjective``) of stereotypical vs anti-stereotypical sentences.

Each head's slice of the attention output projection's input is multiplied by a mask value
m[layer, head] (1 = unchanged) in a forward pre-hook. The gradient score is d objective / d m
at m = 1, the first-order estimate of how much the objective would fall if the head were
removed; the ablation score is that fall measured exactly (objective with m = 1 minus objective
with that head's m = 0). Positive = the head pushes the model towards the stereotype. With
grouped-query attention the o_proj input is laid out per query head, so each query head is
scored on its own.

First-order estimates are poor for removing a head (m = 1 -> 0 is no small step): on
SmolLM2-135M the top gradient heads are early-layer heads whose removal hurts fluency and does
not lower held-out bias. ``rank_by="shortlist"`` therefore verifies the gradient's top heads by
exact ablation and charges each for the language-model loss its removal adds on calibration text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import torch

from modelsurgery.editing.mask_heads import format_head
from modelsurgery.editing.stereotypes.metrics import (
    BiasObjective,
    TokenizedPair,
    length_batches,
    pair_batch_gaps,
    pair_gaps,
    tokenize_pairs,
)
from modelsurgery.editing.stereotypes.pairs import ContrastPair
from modelsurgery.models.adapters import get_adapter

StepCallback = Callable[[str, int, int], None]
RankBy = Literal["gradient", "ablation", "shortlist"]


class HeadMask:
    """Context manager: multiplies every head's o_proj input slice by ``values[layer, head]``."""

    def __init__(self, model: torch.nn.Module, *, requires_grad: bool = False) -> None:
        self.adapter = get_adapter(model)
        a = self.adapter
        for layer in range(a.num_layers):
            width = a.attn_out(layer).in_features_of()
            if width != a.num_heads * a.head_dim:
                raise ValueError(
                    f"layer {layer}: o_proj input has {width} columns, expected "
                    f"{a.num_heads} heads x {a.head_dim}"
                )
        device = next(model.parameters()).device
        self.values = torch.ones(a.num_layers, a.num_heads, device=device)
        self.values.requires_grad_(requires_grad)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, layer: int) -> Callable[..., tuple[Any, ...]]:
        heads, head_dim = self.adapter.num_heads, self.adapter.head_dim

        def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            scale = self.values[layer].to(x.dtype)[:, None]
            scaled = x.reshape(*x.shape[:-1], heads, head_dim) * scale
            return (scaled.reshape(x.shape), *args[1:])

        return hook

    def __enter__(self) -> HeadMask:
        for layer in range(self.adapter.num_layers):
            module = self.adapter.attn_out(layer).module
            self._handles.append(module.register_forward_pre_hook(self._hook(layer)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@dataclass
class HeadScores:
    """Layer x head score tables and the objective value they were measured against.

    ``ablation`` and ``loss_increase`` (LM loss added on calibration text, nats/token) are
    NaN for heads that were not ablated; ``ranking`` is what heads are selected by."""

    objective: BiasObjective
    rank_by: RankBy
    gradient: torch.Tensor
    base_gaps: torch.Tensor
    ablation: torch.Tensor | None = None
    loss_increase: torch.Tensor | None = None
    perplexity_penalty: float = 0.0

    @property
    def base_objective(self) -> float:
        return self.objective.value(self.base_gaps)

    @property
    def ranking(self) -> torch.Tensor:
        if self.rank_by == "gradient":
            return self.gradient
        assert self.ablation is not None
        if self.loss_increase is None:
            return self.ablation
        return self.ablation - self.perplexity_penalty * self.loss_increase

    def to_json_dict(self, chosen: Sequence[tuple[int, int]] = ()) -> dict[str, Any]:
        def table(values: torch.Tensor) -> list[list[float | None]]:
            return [[None if v != v else v for v in row] for row in values.tolist()]

        out: dict[str, Any] = {
            "metric": self.objective.kind,
            "temperature": self.objective.temperature,
            "base_objective": self.base_objective,
            "bias_gap": float(self.base_gaps.mean()),
            "num_pairs": int(self.base_gaps.numel()),
            "rank_by": self.rank_by,
            "num_layers": int(self.gradient.shape[0]),
            "num_heads": int(self.gradient.shape[1]),
            "gradient": self.gradient.tolist(),
            "chosen": [format_head(layer, head) for layer, head in chosen],
        }
        if self.ablation is not None:
            out["ablation"] = table(self.ablation)
        if self.loss_increase is not None:
            out["loss_increase"] = table(self.loss_increase)
            out["perplexity_penalty"] = self.perplexity_penalty
        return out


def gradient_scores(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    objective: BiasObjective,
    batch_size: int = 16,
    on_step: StepCallback | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair gaps, d objective / d head-mask) with the mask at 1. The objective is a mean
    over pairs, so each batch of pairs is back-propagated on its own (bounded memory)."""
    batches = list(
        length_batches([max(len(p.stereo), len(p.anti)) for p in pairs], max(1, batch_size // 2))
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    gaps = torch.empty(len(pairs), dtype=torch.float64)
    try:
        with torch.enable_grad(), HeadMask(model, requires_grad=True) as mask:
            for step, batch in enumerate(batches):
                batch_gaps = pair_batch_gaps(model, [pairs[i] for i in batch])
                (objective.per_pair(batch_gaps).sum() / len(pairs)).backward()
                gaps[batch] = batch_gaps.detach().cpu().double()
                if on_step is not None:
                    on_step("gradient scores", step + 1, len(batches))
            assert mask.values.grad is not None
            grad = mask.values.grad.detach().cpu().clone()
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return gaps, grad


@torch.no_grad()
def lm_loss(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy (nats/token) over token windows [n, length]."""
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
        )
    return total / (windows.shape[0] * (windows.shape[1] - 1))


@torch.no_grad()
def ablation_scores(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    heads: Sequence[tuple[int, int]],
    objective: BiasObjective,
    *,
    base_gaps: torch.Tensor | None = None,
    calibration: torch.Tensor | None = None,
    batch_size: int = 16,
    on_step: StepCallback | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Zero each head in turn: (objective(all heads) - objective(head zeroed), and with
    ``calibration`` windows the LM loss the removal adds), as layer x head tables, NaN for
    heads not in ``heads``. ``base_gaps``: the unmasked model's gaps, if already known."""
    if base_gaps is None:
        base_gaps = pair_gaps(model, pairs, batch_size)
    base = objective.value(base_gaps)
    with HeadMask(model) as mask:
        drop = torch.full(mask.values.shape, float("nan"))
        added = torch.full(mask.values.shape, float("nan")) if calibration is not None else None
        base_loss = lm_loss(model, calibration) if calibration is not None else 0.0
        for step, (layer, head) in enumerate(heads):
            mask.values[layer, head] = 0.0
            drop[layer, head] = base - objective.value(pair_gaps(model, pairs, batch_size))
            if added is not None:
                added[layer, head] = lm_loss(model, calibration) - base_loss
            mask.values[layer, head] = 1.0
            if on_step is not None:
                on_step("ablation scores", step + 1, len(heads))
    return drop, added


def score_heads(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Sequence[ContrastPair] | Sequence[TokenizedPair],
    *,
    objective: BiasObjective | None = None,
    rank_by: RankBy = "gradient",
    shortlist_size: int = 16,
    calibration: torch.Tensor | None = None,
    perplexity_penalty: float = 0.0,
    batch_size: int = 16,
    on_step: StepCallback | None = None,
) -> HeadScores:
    """Bias scores of every (layer, head) on contrast pairs (text pairs need the tokenizer;
    already tokenized pairs do not). ``rank_by``: ``"gradient"`` (one backward pass),
    ``"ablation"`` (every head zeroed in turn) or ``"shortlist"`` (the ``shortlist_size``
    best gradient heads zeroed in turn). With ``calibration`` windows, ablated heads are
    ranked by objective drop minus ``perplexity_penalty`` x the LM loss their removal adds."""
    if not pairs:
        raise ValueError("no contrast pairs to score heads on")
    if all(isinstance(p, TokenizedPair) for p in pairs):
        tokenized = list(pairs)
    elif all(isinstance(p, ContrastPair) for p in pairs):
        tokenized = tokenize_pairs(tokenizer, pairs)
    else:
        raise TypeError("pairs must be all ContrastPair or all TokenizedPair")
    objective = objective or BiasObjective()
    gaps, grad = gradient_scores(model, tokenized, objective, batch_size, on_step)
    scores = HeadScores(objective, rank_by, grad, gaps, perplexity_penalty=perplexity_penalty)
    if rank_by == "gradient":
        return scores
    layers, heads = grad.shape
    if rank_by == "ablation":
        candidates = [(layer, head) for layer in range(layers) for head in range(heads)]
    else:
        candidates = select_heads(grad, top_k=min(shortlist_size, layers * heads))
    scores.ablation, scores.loss_increase = ablation_scores(
        model,
        tokenized,
        candidates,
        objective,
        base_gaps=gaps,
        calibration=calibration if perplexity_penalty > 0 else None,
        batch_size=batch_size,
        on_step=on_step,
    )
    return scores


def select_heads(
    scores: torch.Tensor, *, top_k: int | None = None, z_threshold: float | None = None
) -> list[tuple[int, int]]:
    """The heads to mask, highest score first: the ``top_k`` best, or every head whose
    z-score (against all scored heads) exceeds ``z_threshold``. NaN = not scored, never picked."""
    if (top_k is None) == (z_threshold is None):
        raise ValueError("give exactly one of top_k and z_threshold")
    flat = scores.flatten()
    scored = torch.nonzero(~torch.isnan(flat)).flatten()
    values = flat[scored]
    order = scored[torch.argsort(values, descending=True, stable=True)].tolist()
    if top_k is not None:
        picked = order[:top_k]
    else:
        std = values.std() if values.numel() > 1 else values.new_zeros(())
        z = (flat - values.mean()) / std if std > 0 else torch.zeros_like(flat)
        picked = [i for i in order if z[i] > z_threshold]
    heads = scores.shape[1]
    return [(i // heads, i % heads) for i in picked]
