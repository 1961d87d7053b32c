"""Which tensors differ between two versions, and by how much."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from modelsurgery.checkpoints.manifest import TensorEntry

ChangeStatus = Literal["added", "removed", "changed", "reshaped"]


@dataclass(frozen=True)
class TensorChange:
    """``relative_norm`` is ||b - a|| / ||a|| for ``changed``, None otherwise."""

    name: str
    status: ChangeStatus
    relative_norm: float | None = None


def relative_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    delta = float(torch.linalg.vector_norm(b64 - a64))
    base = float(torch.linalg.vector_norm(a64))
    if base == 0.0:
        return 0.0 if delta == 0.0 else float("inf")
    return delta / base


def diff_entries(
    a: dict[str, TensorEntry],
    b: dict[str, TensorEntry],
    load: Callable[[TensorEntry], torch.Tensor],
) -> list[TensorChange]:
    """Compare two resolved tensor maps; tensors with the same blob are not read at all."""
    changes = []
    for name in sorted(a.keys() | b.keys()):
        left, right = a.get(name), b.get(name)
        if left is None:
            changes.append(TensorChange(name, "added"))
        elif right is None:
            changes.append(TensorChange(name, "removed"))
        elif left.shape != right.shape:
            changes.append(TensorChange(name, "reshaped"))
        elif left != right:
            norm = relative_norm(load(left), load(right))
            changes.append(TensorChange(name, "changed", norm))
    return changes
