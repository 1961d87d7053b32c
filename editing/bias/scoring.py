"""Per-head bias scores (Yang et al. 2023, "Bias A-head?"): how much each attention head
drives the log-likelihood gap between stereotypical and anti-stereotypical sentences.

Each head's slice of the attention output projection's input is multiplied by a mask value
m[layer, head] (1 = unchanged) in a forward pre-hook. The gradient score is d gap / d m at
m = 1, the first-order estimate of how much the gap would fall if the head were removed; the
ablation score is that fall measured exactly (gap with m = 1 minus gap with that head's m = 0).
Positive = the head pushes the model towards the stereotype. With grouped-query attention the
o_proj input is laid out per query head, so each query head is scored on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch

from modelsurgery.editing.bias.metrics import (
    TokenizedPair,
    flatten_pairs,
    length_batches,
    pair_gaps,
    sequence_logprobs,
    tokenize_pairs,
)
from modelsurgery.editing.bias.pairs import ContrastPair
from modelsurgery.editing.mask_heads import format_head
from modelsurgery.models.adapters import get_adapter

StepCallback = Callable[[str, int, int], None]


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
    """Layer x head score tables and the gap they were measured on."""

    gradient: torch.Tensor
    bias_gap: float
    num_pairs: int
    ablation: torch.Tensor | None = None

    def table(self, name: str) -> torch.Tensor:
        if name == "gradient":
            return self.gradient
        if name == "ablation" and self.ablation is not None:
            return self.ablation
        raise ValueError(f"no {name!r} score table (ablation scores are computed on request)")

    def to_json_dict(self, chosen: Sequence[tuple[int, int]] = ()) -> dict[str, Any]:
        out: dict[str, Any] = {
            "metric": "bias_gap",
            "bias_gap": self.bias_gap,
            "num_pairs": self.num_pairs,
            "num_layers": int(self.gradient.shape[0]),
            "num_heads": int(self.gradient.shape[1]),
            "gradient": self.gradient.tolist(),
            "chosen": [format_head(layer, head) for layer, head in chosen],
        }
        if self.ablation is not None:
            out["ablation"] = self.ablation.tolist()
        return out


def gradient_scores(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    batch_size: int = 16,
    on_step: StepCallback | None = None,
) -> tuple[float, torch.Tensor]:
    """(mean gap, d mean-gap / d head-mask) with the mask at 1. The gap is linear in the
    sentence log-likelihoods, so each batch is back-propagated on its own (bounded memory)."""
    sentences, signs = flatten_pairs(pairs)
    batches = list(length_batches([len(s) for s in sentences], batch_size))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    total = 0.0
    try:
        with torch.enable_grad(), HeadMask(model, requires_grad=True) as mask:
            for step, batch in enumerate(batches):
                lp = sequence_logprobs(model, [sentences[i] for i in batch])
                contribution = (lp * signs[batch].to(lp.device)).sum() / len(pairs)
                contribution.backward()
                total += float(contribution.detach())
                if on_step is not None:
                    on_step("gradient scores", step + 1, len(batches))
            assert mask.values.grad is not None
            grad = mask.values.grad.detach().cpu().clone()
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return total, grad


@torch.no_grad()
def ablation_scores(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    batch_size: int = 16,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """gap(all heads) - gap(this head zeroed), one evaluation per head (L*H of them)."""
    base = float(pair_gaps(model, pairs, batch_size).mean())
    with HeadMask(model) as mask:
        layers, heads = mask.values.shape
        scores = torch.zeros(layers, heads)
        for layer in range(layers):
            for head in range(heads):
                mask.values[layer, head] = 0.0
                scores[layer, head] = base - float(pair_gaps(model, pairs, batch_size).mean())
                mask.values[layer, head] = 1.0
                if on_step is not None:
                    on_step("ablation scores", layer * heads + head + 1, layers * heads)
    return scores


def score_heads(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Sequence[ContrastPair] | Sequence[TokenizedPair],
    *,
    batch_size: int = 16,
    ablation: bool = False,
    on_step: StepCallback | None = None,
) -> HeadScores:
    """Bias scores of every (layer, head) on contrast pairs (text pairs need the tokenizer;
    already tokenized pairs do not)."""
    if not pairs:
        raise ValueError("no contrast pairs to score heads on")
    if all(isinstance(p, TokenizedPair) for p in pairs):
        tokenized = list(pairs)
    elif all(isinstance(p, ContrastPair) for p in pairs):
        tokenized = tokenize_pairs(tokenizer, pairs)
    else:
        raise TypeError("pairs must be all ContrastPair or all TokenizedPair")
    gap, grad = gradient_scores(model, tokenized, batch_size, on_step)
    ablated = ablation_scores(model, tokenized, batch_size, on_step) if ablation else None
    return HeadScores(gradient=grad, bias_gap=gap, num_pairs=len(tokenized), ablation=ablated)


def select_heads(
    scores: torch.Tensor, *, top_k: int | None = None, z_threshold: float | None = None
) -> list[tuple[int, int]]:
    """The heads to mask, highest score first: the ``top_k`` best, or every head whose
    z-score (against all heads) exceeds ``z_threshold``."""
    if (top_k is None) == (z_threshold is None):
        raise ValueError("give exactly one of top_k and z_threshold")
    flat = scores.flatten()
    order = torch.argsort(flat, descending=True, stable=True).tolist()
    if top_k is not None:
        picked = order[:top_k]
    else:
        std = flat.std()
        z = (flat - flat.mean()) / std if std > 0 else torch.zeros_like(flat)
        picked = [i for i in order if z[i] > z_threshold]
    heads = scores.shape[1]
    return [(i // heads, i % heads) for i in picked]
