"""The frozen projections a LoRA trains over, held in the training dtype while it trains.

Under autocast every matmul casts its float32 weight again at each forward, and autograd keeps
each cast for the backward pass: a training step held a bfloat16 copy of every frozen
projection beside the float32 weights (1.5 GB for a 0.8B model), and the freed copies piled up
in the heap. Casting each frozen projection weight of the decoder layers once, before the first
forward, hands autocast the very tensors it would have made (the same cast, so training is bit
for bit the same) and lets the float32 ones go meanwhile (``MethodContext.set_aside``: on the
server they come back from the store's memory map after training; elsewhere they stay
referenced). The embedding, the head and the norms are not cast: autocast does not run those
in the training dtype, or casts the head's weight itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from modelsurgery.editing.registry import PutBack, keep_aside
from modelsurgery.models.adapters import get_adapter
from modelsurgery.models.memory import give_back_freed_memory


def frozen_projection_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights of the decoder layers' linear projections that training does not update
    (peft's base layers and the projections it does not adapt; never its A and B)."""
    weights: dict[int, nn.Parameter] = {}
    for layer in get_adapter(model).layers():
        for module in layer.modules():
            if isinstance(module, nn.Linear | Conv1D) and not module.weight.requires_grad:
                weights.setdefault(id(module.weight), module.weight)
    return list(weights.values())


@contextmanager
def frozen_in(
    model: nn.Module,
    dtype: torch.dtype | None,
    set_aside: Callable[[nn.Parameter], PutBack] = keep_aside,
) -> Iterator[None]:
    """While the block runs, the frozen projection weights are in ``dtype`` (the autocast
    dtype; None: training runs in the weights' own dtype and nothing changes); afterwards they
    are put back exactly as before."""
    with ExitStack() as stack:
        stack.callback(give_back_freed_memory)  # runs last: the casts are gone by then
        if dtype is not None:
            for weight in frozen_projection_weights(model):
                if weight.is_floating_point() and weight.dtype != dtype:
                    stack.callback(set_aside(weight))
                    weight.data = weight.data.to(dtype)
        yield
