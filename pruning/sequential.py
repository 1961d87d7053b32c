"""Sequential reconstruction of one decoder layer: its linear layers in forward order, each
group that reads one input refitted on the inputs the already pruned modules before it give.

One pass of the layer per group collects the Gram matrix X^T X of that group's input (float64
across batches) and stops as soon as the forward reaches a module that reads another tensor, so
the memory held is one Gram matrix and the extra compute is the layer's prefix per group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from modelsurgery.models.adapters import Projection
from modelsurgery.pruning.calibration import LayerInputs, LayerwiseCalibration, StopForward
from modelsurgery.pruning.refit import (
    Sparsity,
    importance,
    inverse_hessian_factor,
    refit_weights,
)


class _GroupGram:
    """Gram matrix of the first input any watched module reads, and who reads it."""

    def __init__(self, watched: int) -> None:
        self.watched = watched
        self.readers: list[str] = []
        self.gram: torch.Tensor | None = None
        self.current: torch.Tensor | None = None

    def new_batch(self, *_: Any) -> None:
        self.current = None

    def see(self, name: str, x: torch.Tensor) -> None:
        if self.current is None:
            self.current = x
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            with torch.autocast(flat.device.type, enabled=False):  # not in bfloat16
                product = (flat.T @ flat).double()
            self.gram = product if self.gram is None else self.gram.add_(product)
        elif x is not self.current:
            raise StopForward  # the next group's input: this group is complete
        if name not in self.readers:
            self.readers.append(name)
        if len(self.readers) == self.watched:
            raise StopForward


@contextmanager
def _watch(layer: nn.Module, modules: dict[str, nn.Module], state: _GroupGram) -> Iterator[None]:
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


def next_group(
    calibration: LayerwiseCalibration,
    index: int,
    inputs: LayerInputs,
    modules: dict[str, nn.Module],
) -> tuple[list[str], torch.Tensor]:
    """The modules of layer ``index`` (among ``modules``) that read the first input the
    forward reaches, and that input's Gram matrix over every calibration batch."""
    state = _GroupGram(len(modules))
    with _watch(calibration.adapter.layer(index), modules, state):
        calibration.feed(index, inputs)
    if state.gram is None:
        raise ValueError(f"refit: no calibration input reached {', '.join(modules)}")
    return state.readers, state.gram


def refit_layer(
    calibration: LayerwiseCalibration,
    index: int,
    inputs: LayerInputs,
    modules: dict[str, nn.Module],
    *,
    sparsity: Sparsity,
    score: str,
    damping: float,
    check_cancelled: Callable[[], None],
) -> None:
    """Prune and refit every module of layer ``index`` group by group, in place; the modules
    of one group share the Gram matrix, its factor and one sweep."""
    conv1d = calibration.adapter.layout.conv1d
    remaining = dict(modules)
    while remaining:
        check_cancelled()
        names, gram = next_group(calibration, index, inputs, remaining)
        factor = inverse_hessian_factor(gram, damping)
        input_l2 = gram.diagonal().sqrt().float()
        del gram
        weights = [Projection(remaining.pop(name), conv1d).weight for name in names]
        importances = [importance(score, weight, input_l2) for weight in weights]
        refit_weights(weights, factor, sparsity, importances)
