"""Sequential reconstruction of one decoder layer: its linear layers in forward order, grouped
by the input they read (q/k/v, o, gate/up, down), each group refitted from its input's Gram
matrix X^T X (``pruning.gram``).

With ``refit_inputs: pruned`` each group's Gram matrix is collected in its own pass of the layer,
on the inputs the already pruned modules before it give; the pass stops as soon as the forward
reaches a module that reads another tensor, so the extra compute is the layer's prefix per group
and one Gram matrix is held at a time. With ``dense`` one pass collects every group's Gram matrix
from the dense layer (SparseGPT's default): one prefix instead of four, all of one layer's Gram
matrices held at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from modelsurgery.models.adapters import Projection
from modelsurgery.pruning.calibration import LayerInputs, LayerwiseCalibration, StopForward
from modelsurgery.pruning.gram import GramSum, uses_bfloat16_products
from modelsurgery.pruning.refit import (
    Sparsity,
    importance,
    inverse_hessian_factor,
    refit_weights,
)


class _Groups:
    """Gram matrices of the inputs the watched modules read, one per distinct input tensor,
    in the order the forward reaches them, and who reads each; at most ``limit`` groups."""

    def __init__(self, watched: int, limit: int | None, bfloat16_products: bool) -> None:
        self.watched = watched
        self.limit = limit
        self.bfloat16_products = bfloat16_products
        self.readers: list[list[str]] = []
        self.grams: list[GramSum] = []
        self.batch_inputs: list[torch.Tensor] = []
        self.batch_seen: set[str] = set()

    def new_batch(self, *_: Any) -> None:
        self.batch_inputs = []
        self.batch_seen = set()

    def see(self, name: str, x: torch.Tensor) -> None:
        group = next((k for k, seen in enumerate(self.batch_inputs) if seen is x), None)
        if group is None:
            if len(self.batch_inputs) == self.limit:
                raise StopForward  # the next group's input: the groups asked for are complete
            group = len(self.batch_inputs)
            self.batch_inputs.append(x)
            if group == len(self.grams):
                self.grams.append(GramSum(x.shape[-1], x.device, self.bfloat16_products))
                self.readers.append([])
            self.grams[group].add(x)
        if name not in self.readers[group]:
            self.readers[group].append(name)
        self.batch_seen.add(name)
        if len(self.batch_seen) == self.watched:
            raise StopForward


@contextmanager
def _watch(layer: nn.Module, modules: dict[str, nn.Module], state: _Groups) -> Iterator[None]:
    handles = [layer.register_forward_pre_hook(state.new_batch)]
    for name, module in modules.items():

        def hook(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            state.see(name, args[0])

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def input_groups(
    calibration: LayerwiseCalibration,
    index: int,
    inputs: LayerInputs,
    modules: dict[str, nn.Module],
    limit: int | None = None,
) -> list[tuple[list[str], torch.Tensor]]:
    """The modules of layer ``index`` (among ``modules``) grouped by the input they read, in
    forward order (the first ``limit`` groups), each with that input's Gram matrix over every
    calibration batch, from one pass of the layer."""
    bfloat16_products = uses_bfloat16_products(calibration.device, calibration.dtype)
    state = _Groups(len(modules), limit, bfloat16_products)
    with _watch(calibration.adapter.layer(index), modules, state):
        calibration.feed(index, inputs)
    if not state.grams:
        raise ValueError(f"refit: no calibration input reached {', '.join(modules)}")
    return [(names, gram.total) for names, gram in zip(state.readers, state.grams, strict=True)]


def refit_layer(
    calibration: LayerwiseCalibration,
    index: int,
    inputs: LayerInputs,
    modules: dict[str, nn.Module],
    *,
    sparsity: Sparsity,
    score: str,
    damping: float,
    refit_inputs: str,
    check_cancelled: Callable[[], None],
) -> None:
    """Prune and refit every module of layer ``index`` group by group, in place; the modules
    of one group share the Gram matrix, its factor and one sweep."""
    conv1d = calibration.adapter.layout.conv1d
    remaining = dict(modules)
    limit = 1 if refit_inputs == "pruned" else None
    while remaining:
        check_cancelled()
        groups = input_groups(calibration, index, inputs, remaining, limit)
        while groups:
            check_cancelled()
            names, gram = groups.pop(0)
            factor = inverse_hessian_factor(gram, damping)
            input_l2 = gram.diagonal().sqrt().float()
            del gram
            weights = [Projection(remaining.pop(name), conv1d).weight for name in names]
            importances = [importance(score, weight, input_l2) for weight in weights]
            refit_weights(weights, factor, sparsity, importances)
