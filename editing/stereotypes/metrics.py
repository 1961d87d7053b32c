"""Sentence log-likelihoods and the CrowS-Pairs-style bias metrics of a causal LM.

A sentence's score is the sum of its tokens' log-probabilities, each token conditioned on the
ones before it and on one start token (BOS, else EOS) so that the first word is scored too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from modelsurgery.editing.stereotypes.pairs import ContrastPair


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids (start token included) of a pair's stereotypical and anti sentence."""

    stereo: tuple[int, ...]
    anti: tuple[int, ...]


def start_token_id(tokenizer: Any) -> int:
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise ValueError("tokenizer has neither a BOS nor an EOS token to start sentences with")


def tokenize_pairs(tokenizer: Any, pairs: Sequence[ContrastPair]) -> list[TokenizedPair]:
    start = start_token_id(tokenizer)

    def encode(text: str) -> tuple[int, ...]:
        return (start, *tokenizer(text, add_special_tokens=False).input_ids)

    return [TokenizedPair(encode(p.stereo), encode(p.anti)) for p in pairs]


def length_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length (less padding)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def sequence_logprobs(model: torch.nn.Module, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """Sum of next-token log-probs of each sequence (one batch, right-padded); differentiable
    when grad is enabled."""
    device = next(model.parameters()).device
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(sequences), width, dtype=torch.long, device=device)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long, device=device)
        mask[row, : len(seq)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    token_lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token_lp * mask[:, 1:]).sum(dim=-1)


def pair_batch_gaps(model: torch.nn.Module, pairs: Sequence[TokenizedPair]) -> torch.Tensor:
    """log p(stereo) - log p(anti) of a few pairs in one batch (both sentences of each pair
    together, so a non-linear objective of the gap can be back-propagated batch by batch)."""
    sentences = [p.stereo for p in pairs] + [p.anti for p in pairs]
    scores = sequence_logprobs(model, sentences)
    return scores[: len(pairs)] - scores[len(pairs) :]


@torch.no_grad()
def pair_gaps(
    model: torch.nn.Module, pairs: Sequence[TokenizedPair], batch_size: int = 16
) -> torch.Tensor:
    """log p(stereo) - log p(anti) per pair."""
    sentences = [p.stereo for p in pairs] + [p.anti for p in pairs]
    scores = torch.empty(len(sentences), dtype=torch.float64)
    for batch in length_batches([len(s) for s in sentences], batch_size):
        scores[batch] = sequence_logprobs(model, [sentences[i] for i in batch]).cpu().double()
    return scores[: len(pairs)] - scores[len(pairs) :]


def summarize_gaps(gaps: torch.Tensor) -> dict[str, float]:
    """``stereotype_share``: pairs where the stereotype is more likely (ties count half, so
    0.5 = unbiased); ``bias_gap``: mean log-likelihood gap in nats (0 = unbiased)."""
    share = ((gaps > 0).float() + 0.5 * (gaps == 0).float()).mean()
    return {"stereotype_share": float(share), "bias_gap": float(gaps.mean())}


def bias_metrics(
    model: torch.nn.Module, pairs: Sequence[TokenizedPair], batch_size: int = 16
) -> dict[str, float]:
    return summarize_gaps(pair_gaps(model, pairs, batch_size))


@dataclass(frozen=True)
class BiasObjective:
    """What head scores measure the effect on. ``"gap"``: the mean log-likelihood gap, which
    a few pairs with gaps of 10-20 nats (frequency effects of the swapped word) dominate;
    ``"share"``: the mean of sigmoid(gap / temperature), a smooth stereotype share in which
    every pair counts about equally and saturated outliers barely at all."""

    kind: Literal["gap", "share"] = "share"
    temperature: float = 1.0

    def per_pair(self, gaps: torch.Tensor) -> torch.Tensor:
        if self.kind == "gap":
            return gaps
        return torch.sigmoid(gaps / self.temperature)

    def value(self, gaps: torch.Tensor) -> float:
        return float(self.per_pair(gaps).mean())
