"""Layer-by-layer calibration: run decoder layer i on every calibration window (batched), collect
input statistics of its linear layers through hooks, and feed its outputs to layer i + 1.

Memory stays bounded by one layer's activations for the calibration set (two hidden-state
buffers), never the whole model's; this is the SparseGPT / Wanda scheme, but batched instead of
one sample at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelsurgery.editing.data import (
    calibration_windows,
    read_text,
    resolve_text_source,
    text_windows,
)
from modelsurgery.models.adapters import ArchitectureAdapter


class StopForward(Exception):
    """Ends a forward pass early: once the first decoder layer's inputs are captured, or once
    every hooked module of a layer has recorded its input."""


@dataclass
class BatchMoments:
    """One batch's column sums of x^2 (and of |x| and x): float32 within the batch, float64
    across batches."""

    sq_sum: torch.Tensor
    abs_sum: torch.Tensor | None
    sum: torch.Tensor | None
    count: int

    @classmethod
    def of(cls, x: torch.Tensor, first_moments: bool) -> BatchMoments:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        abs_sum = total = None
        if first_moments:
            abs_sum = flat.abs().sum(0).double()
            total = flat.sum(0).double()
        return cls(flat.square().sum(0).double(), abs_sum, total, flat.shape[0])


@dataclass
class InputStats:
    """Per-input-column statistics of one linear layer over all calibration tokens."""

    sq_sum: torch.Tensor
    abs_sum: torch.Tensor
    sum: torch.Tensor
    count: int = 0

    @classmethod
    def zeros(cls, size: int, device: torch.device) -> InputStats:
        z = torch.zeros(size, dtype=torch.float64, device=device)
        return cls(z.clone(), z.clone(), z.clone())

    def add(self, moments: BatchMoments) -> None:
        self.sq_sum += moments.sq_sum
        if moments.abs_sum is not None and moments.sum is not None:
            self.abs_sum += moments.abs_sum
            self.sum += moments.sum
        self.count += moments.count

    def l2(self) -> torch.Tensor:
        """||X_j||_2 over calibration tokens (Wanda's activation norm)."""
        return self.sq_sum.sqrt().float()

    def rms(self) -> torch.Tensor:
        return (self.sq_sum / max(self.count, 1)).sqrt().float()

    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).float()

    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.count, 1)).float()


@dataclass
class LayerInputs:
    """Hidden states entering one decoder layer, per batch, plus the other call arguments."""

    hidden: list[torch.Tensor]
    args: list[tuple[Any, ...]] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)


class LayerwiseCalibration:
    """Drives decoder layers one at a time over the calibration windows."""

    def __init__(
        self,
        model: nn.Module,
        adapter: ArchitectureAdapter,
        ids: torch.Tensor,
        *,
        batch_size: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.ids = ids
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = next(model.parameters()).device

    def _autocast(self) -> Any:
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def capture(self) -> LayerInputs:
        """Inputs of the first decoder layer for every batch (embeddings, masks, positions)."""
        captured = LayerInputs(hidden=[])

        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if args:
                captured.hidden.append(args[0])
                captured.args.append(args[1:])
                captured.kwargs.append(dict(kwargs))
            else:
                rest = dict(kwargs)
                captured.hidden.append(rest.pop("hidden_states"))
                captured.args.append(())
                captured.kwargs.append(rest)
            raise StopForward

        handle = self.adapter.layer(0).register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for start in range(0, self.ids.shape[0], self.batch_size):
                batch = self.ids[start : start + self.batch_size].to(self.device)
                try:
                    with self._autocast():
                        self.model(input_ids=batch, use_cache=False)
                except StopForward:
                    pass
        finally:
            handle.remove()
        return captured

    @torch.no_grad()
    def run_layer(self, index: int, inputs: LayerInputs) -> LayerInputs:
        """Outputs of decoder layer ``index`` for every batch (the next layer's inputs)."""
        layer = self.adapter.layer(index)
        out: list[torch.Tensor] = []
        with self._autocast():  # one context for all batches: weights are cast once
            for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs, strict=True):
                result = layer(hidden, *args, **kwargs)
                out.append(result[0] if isinstance(result, tuple) else result)
        return LayerInputs(hidden=out, args=inputs.args, kwargs=inputs.kwargs)

    @torch.no_grad()
    def collect(
        self,
        index: int,
        inputs: LayerInputs,
        modules: dict[str, nn.Module],
        *,
        first_moments: bool = False,
    ) -> dict[str, InputStats]:
        """Input statistics of ``modules`` (name -> module inside layer ``index``) over all
        batches: sums of squares, and of |x| and x with ``first_moments``. Each batch's pass
        stops once every module has seen its input. No outputs are kept: the layer is pruned
        next and its pruned outputs, not these, feed the following layer (as in Wanda /
        SparseGPT)."""
        stats: dict[str, InputStats] = {}
        with _input_hooks(modules, stats, first_moments):
            self.feed(index, inputs)
        return stats

    @torch.no_grad()
    def feed(self, index: int, inputs: LayerInputs) -> None:
        """Run decoder layer ``index`` on every batch for the hooks on its modules, keeping no
        output; a hook ends a batch's pass early by raising ``StopForward``."""
        layer = self.adapter.layer(index)
        with self._autocast():
            for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs, strict=True):
                with suppress(StopForward):
                    layer(hidden, *args, **kwargs)


@contextmanager
def _input_hooks(
    modules: dict[str, nn.Module],
    stats: dict[str, InputStats],
    first_moments: bool,
) -> Iterator[None]:
    handles = []
    # q/k/v (and gate/up) read the same tensor: its moments are computed once per batch.
    shared: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, BatchMoments]] = {}
    seen: set[str] = set()
    for name, module in modules.items():

        def hook(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))
            if key not in shared or shared[key][0] is not x:
                shared.clear()
                shared[key] = (x, BatchMoments.of(x, first_moments))
            if name not in stats:
                stats[name] = InputStats.zeros(x.shape[-1], x.device)  # the layer's device
            stats[name].add(shared[key][1])
            seen.add(name)
            if len(seen) == len(modules):  # nothing later in the layer is needed
                seen.clear()
                raise StopForward

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def calibration_ids(
    tokenizer: Any,
    *,
    samples: int,
    seqlen: int,
    seed: int,
    data: str | None,
    data_roots: tuple[Path, ...],
) -> torch.Tensor:
    """[samples, seqlen] token ids: WikiText-2 validation text, or the user's text (a file under
    a data root or a shared data set; JSONL files give their ``text`` fields)."""
    if data is None:
        return calibration_windows(tokenizer, samples, seqlen, seed=seed)
    field = "calibration_data"
    path = resolve_text_source(data, data_roots, field)
    return text_windows(tokenizer, read_text(path, field), samples, seqlen, seed, field)
