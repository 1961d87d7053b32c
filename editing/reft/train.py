"""Training loop: AdamW on the intervention parameters only, loss on completion tokens."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from modelsurgery.editing.examples import IGNORE_INDEX, Batch, TokenizedExample, collate
from modelsurgery.editing.reft.hooks import InterventionHandle
from modelsurgery.editing.registry import MethodContext


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float
    seed: int
    pad_id: int


@dataclass(frozen=True)
class TrainStats:
    steps: int
    seconds: float
    last_step_loss: float


def batch_loss(model: nn.Module, handle: InterventionHandle, batch: Batch) -> torch.Tensor:
    """Mean NLL of the completion tokens, interventions on the prompt positions."""
    device = next(model.parameters()).device
    with handle.prompt_lengths(batch.prompt_lengths):
        logits = model(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            use_cache=False,
        ).logits
    labels = batch.labels.to(device)[:, 1:]
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX
    )


@torch.no_grad()
def mean_loss(
    model: nn.Module,
    handle: InterventionHandle,
    items: Sequence[TokenizedExample],
    settings: TrainSettings,
) -> float:
    """Completion-token NLL averaged over tokens of all examples (interventions in eval mode)."""
    was_training = handle.interventions.training
    handle.interventions.eval()
    total, count = 0.0, 0
    for start in range(0, len(items), settings.batch_size):
        batch = collate(items[start : start + settings.batch_size], settings.pad_id)
        tokens = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
        total += float(batch_loss(model, handle, batch)) * tokens
        count += tokens
    handle.interventions.train(was_training)
    return total / count


def _param_groups(interventions: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay never reaches a parametrised rotation: torch's householder
    parametrisation keeps the column signs on its diagonal, and decaying them zeroes R."""
    decay, plain = [], []
    for name, param in interventions.named_parameters():
        if param.requires_grad:
            (plain if ".parametrizations." in name else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]


def train(
    model: nn.Module,
    handle: InterventionHandle,
    items: Sequence[TokenizedExample],
    settings: TrainSettings,
    context: MethodContext,
) -> TrainStats:
    """Shuffled mini-batches for ``epochs`` epochs, linear learning-rate decay to 0 (as
    pyreft's default Trainer schedule); emits one ``train`` progress event per step."""
    interventions = handle.interventions
    optimizer = torch.optim.AdamW(
        _param_groups(interventions, settings.weight_decay), lr=settings.lr
    )
    per_epoch = -(-len(items) // settings.batch_size)
    total = per_epoch * settings.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    generator = torch.Generator().manual_seed(settings.seed)
    interventions.train()
    started = time.perf_counter()
    step, loss_value = 0, float("nan")
    for epoch in range(settings.epochs):
        order = torch.randperm(len(items), generator=generator).tolist()
        for start in range(0, len(items), settings.batch_size):
            context.check_cancelled()
            batch = collate(
                [items[i] for i in order[start : start + settings.batch_size]], settings.pad_id
            )
            loss = batch_loss(model, handle, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            loss_value = float(loss.detach())
            context.progress("train", step=step, total=total, loss=loss_value, epoch=epoch + 1)
    interventions.eval()
    return TrainStats(steps=step, seconds=time.perf_counter() - started, last_step_loss=loss_value)
