"""The LoRA training loop: AdamW on the adapter's A and B only; the objective's NLL plus, for
facts, KL(base || edited) on the prompts whose predictions must not move."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from modelsurgery.editing.examples import IGNORE_INDEX, Batch, TokenizedExample, collate
from modelsurgery.editing.knowledge import tokens as tk
from modelsurgery.editing.lora.data import TrainingData
from modelsurgery.editing.registry import MethodContext

LOSS_ITEMS = 64


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float
    kl_factor: float
    seed: int
    pad_id: int
    autocast: torch.dtype | None = None


@dataclass(frozen=True)
class TrainStats:
    steps: int
    seconds: float


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _autocast(model: nn.Module, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(_device(model).type, dtype=dtype)


def nll(model: nn.Module, batch: Batch, autocast: torch.dtype | None = None) -> torch.Tensor:
    """Mean NLL over the labelled tokens (labels shifted: position t predicts token t + 1)."""
    device = _device(model)
    with _autocast(model, autocast):
        logits = model(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            use_cache=False,
        ).logits  # (B, T, V)
    labels = batch.labels.to(device)[:, 1:]  # (B, T - 1)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX
    )


def next_token_logprobs(
    model: nn.Module,
    prompts: Sequence[list[int]],
    pad_id: int,
    autocast: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities at every real position of right-padded prompts, and the mask."""
    ids, mask = tk.pad_batch([tk.Sequence(ids=prompt) for prompt in prompts], pad_id)
    device = _device(model)
    with _autocast(model, autocast):
        logits = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
        ).logits
    return torch.log_softmax(logits.float(), dim=-1), mask.to(device)  # (B, T, V), (B, T)


def kl_to_base(
    model: nn.Module,
    prompts: Sequence[list[int]],
    base_logp: torch.Tensor,
    settings: TrainSettings,
) -> torch.Tensor:
    """KL(base || edited) per position, averaged over the prompts' real tokens."""
    logp, mask = next_token_logprobs(model, prompts, settings.pad_id, settings.autocast)
    per_position = (base_logp.exp() * (base_logp - logp)).sum(-1)  # (B, T)
    return (per_position * mask).sum() / mask.sum()


@torch.no_grad()
def mean_nll(model: nn.Module, items: Sequence[TokenizedExample], settings: TrainSettings) -> float:
    """The objective's NLL over the labelled tokens of the first ``LOSS_ITEMS`` items (dropout
    off): a before/after figure that costs seconds, not a second pass over a large text."""
    was_training = model.training
    model.eval()
    items = items[:LOSS_ITEMS]
    total, count = 0.0, 0
    for start in range(0, len(items), settings.batch_size):
        batch = collate(items[start : start + settings.batch_size], settings.pad_id)
        tokens = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
        total += float(nll(model, batch, settings.autocast)) * tokens
        count += tokens
    model.train(was_training)
    return total / count


def train(
    model: nn.Module,
    data: TrainingData,
    settings: TrainSettings,
    context: MethodContext,
) -> TrainStats:
    """``epochs`` seeded shuffles of the items in batches; each step also takes the next
    ``batch_size`` KL prompts in turn. Cancellation is polled every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    # LoRA starts with B = 0, so before the first step the model's predictions are the base's:
    # the KL targets come from the same model, chunk by chunk.
    base_logp: list[torch.Tensor] = []
    if data.kl_prompts and settings.kl_factor > 0:
        model.eval()
        with torch.no_grad():
            for start in range(0, len(data.kl_prompts), settings.batch_size):
                chunk = data.kl_prompts[start : start + settings.batch_size]
                logp = next_token_logprobs(model, chunk, settings.pad_id, settings.autocast)[0]
                base_logp.append(logp)
    per_epoch = -(-len(data.items) // settings.batch_size)
    total = settings.epochs * per_epoch
    started = time.perf_counter()
    model.train()
    step = 0
    for _epoch in range(settings.epochs):
        order = torch.randperm(len(data.items), generator=generator).tolist()
        for start in range(0, len(order), settings.batch_size):
            context.check_cancelled()
            batch = collate(
                [data.items[i] for i in order[start : start + settings.batch_size]], settings.pad_id
            )
            loss = nll(model, batch, settings.autocast)
            kl_value = None
            if base_logp:
                chunk = step % len(base_logp)
                first = chunk * settings.batch_size
                prompts = data.kl_prompts[first : first + settings.batch_size]
                kl = kl_to_base(model, prompts, base_logp[chunk], settings)
                loss = loss + settings.kl_factor * kl
                kl_value = kl.item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            event = {"step": step, "total": total, "loss": loss.item()}
            context.progress("lora: training", **event, **({"kl": kl_value} if base_logp else {}))
    model.eval()
    return TrainStats(steps=step, seconds=time.perf_counter() - started)
