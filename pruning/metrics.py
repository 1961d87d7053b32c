"""What pruning bought: parameter and byte counts, sparsity per module, forward latency."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from modelsurgery.models.adapters import ArchitectureAdapter
from modelsurgery.models.digest import persistent_state_dict


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of the tensors ``save_pretrained`` writes (tied ones once)."""
    tensors = persistent_state_dict(model).values()
    return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


def block_projections(adapter: ArchitectureAdapter, layers: list[int]) -> dict[str, nn.Module]:
    """Every Linear / Conv1D inside the given decoder layers, by full module name."""
    out: dict[str, nn.Module] = {}
    for i in layers:
        prefix = f"{adapter.layout.layers}.{i}"
        for name, module in adapter.layer(i).named_modules():
            if isinstance(module, nn.Linear | Conv1D):
                out[f"{prefix}.{name}"] = module
    return out


@dataclass(frozen=True)
class WeightShape:
    shape: tuple[int, ...]
    numel: int


def weight_shapes(modules: dict[str, nn.Module]) -> dict[str, WeightShape]:
    return {
        name: WeightShape(tuple(m.weight.shape), m.weight.numel()) for name, m in modules.items()
    }


def sparsity_table(
    before: dict[str, WeightShape], model: nn.Module
) -> tuple[float, list[dict[str, object]]]:
    """Overall and per-module fraction of the original weights that are now zero or gone."""
    rows: list[dict[str, object]] = []
    total_before, total_kept = 0, 0
    for name, shape in before.items():
        weight = model.get_submodule(name).weight
        kept = int(torch.count_nonzero(weight).item())
        total_before += shape.numel
        total_kept += kept
        rows.append(
            {
                "module": name,
                "shape_before": list(shape.shape),
                "shape_after": list(weight.shape),
                "sparsity": 1.0 - kept / shape.numel,
            }
        )
    overall = 1.0 - total_kept / total_before if total_before else 0.0
    return overall, rows


@torch.no_grad()
def forward_latency(model: nn.Module, ids: torch.Tensor, repeats: int = 3) -> float:
    """Median seconds of one forward pass over ``ids`` (after one warm-up pass)."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    model(input_ids=ids, use_cache=False)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
