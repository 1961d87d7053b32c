"""Layer-by-layer calibration: run decoder layer i on every calibration window (batched), collect
input statistics of its linear layers through hooks, and feed its outputs to layer i + 1.

Memory stays bounded by one layer's activations for the calibration set (two hidden-state
buffers), never the whole model's; this is the SparseGPT / Wanda scheme, but batched instead of
one sample at a time.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelsurgery.editing.data import calibration_windows
from modelsurgery.models.adapters import ArchitectureAdapter


class _StopForward(Exception):
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
            raise _StopForward

        handle = self.adapter.layer(0).register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for start in range(0, self.ids.shape[0], self.batch_size):
                batch = self.ids[start : start + self.batch_size].to(self.device)
                try:
                    with self._autocast():
                        self.model(input_ids=batch, use_cache=False)
                except _StopForward:
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
        layer = self.adapter.layer(index)
        with _input_hooks(modules, stats, self.device, first_moments), self._autocast():
            for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs, strict=True):
                with suppress(_StopForward):
                    layer(hidden, *args, **kwargs)
        return stats


@contextmanager
def _input_hooks(
    modules: dict[str, nn.Module],
    stats: dict[str, InputStats],
    device: torch.device,
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
                stats[name] = InputStats.zeros(x.shape[-1], device)
            stats[name].add(shared[key][1])
            seen.add(name)
            if len(seen) == len(modules):  # nothing later in the layer is needed
                seen.clear()
                raise _StopForward

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def jsonl_text(path: Path) -> str:
    """Texts of a JSONL file of ``{"text": ...}`` records, joined by blank lines."""
    texts = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"calibration_data: line {number} has no string field 'text'")
            texts.append(record["text"])
    return "\n\n".join(texts)


def text_windows(
    tokenizer: Any, text: str, num_windows: int, window: int, seed: int
) -> torch.Tensor:
    """Random token windows from a user's text; shorter text gives shorter windows."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < 2:
        raise ValueError("calibration_data: the text has fewer than 2 tokens")
    window = min(window, int(ids.numel()))
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - window + 1) for _ in range(num_windows)]
    return torch.stack([ids[s : s + window] for s in starts])


def resolve_data_path(value: str, data_roots: tuple[Path, ...]) -> Path:
    """A user data file, accepted only under one of the context's data roots."""
    path = Path(value)
    candidates = [path] if path.is_absolute() else [root / path for root in data_roots]
    for candidate in candidates:
        resolved = candidate.resolve()
        inside = any(resolved.is_relative_to(root.resolve()) for root in data_roots)
        if inside and resolved.is_file():
            return resolved
    raise ValueError(
        f"calibration_data: {value!r} is not a file under the allowed data roots "
        f"({', '.join(str(r) for r in data_roots) or 'none configured'})"
    )


def calibration_ids(
    tokenizer: Any,
    *,
    samples: int,
    seqlen: int,
    seed: int,
    data: str | None,
    data_roots: tuple[Path, ...],
) -> torch.Tensor:
    """[samples, seqlen] token ids: WikiText-2 validation text, or the user's JSONL."""
    if data is None:
        return calibration_windows(tokenizer, samples, seqlen, seed=seed)
    path = resolve_data_path(data, data_roots)
    return text_windows(tokenizer, jsonl_text(path), samples, seqlen, seed)
