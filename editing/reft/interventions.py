"""LoReFT and DiReFT intervention modules, and the per-layer set a ReFT version consists of.

Each module computes only the edit term ``Phi(h) - h``; the hooks add it at the chosen
positions, so positions that are not intervened on stay bit-identical.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from modelsurgery.editing.reft.config import InterventionSpec

ALL_POSITIONS = "all"
FIRST_POSITIONS = "first"
LAST_POSITIONS = "last"


def intervention_slots(first: int, last: int, share_weights: bool) -> tuple[str, ...]:
    """Names of the interventions per layer: one for all positions when weights are tied or
    only one side is chosen, else one for the first and one for the last positions."""
    if first and last and not share_weights:
        return (FIRST_POSITIONS, LAST_POSITIONS)
    return (ALL_POSITIONS,)


class LoreftIntervention(nn.Module):
    """Phi(h) = h + R^T (W h + b - R h), R of shape [rank, hidden] with orthonormal rows.

    ``trainable`` registers torch's orthogonal parametrization on R so that every optimiser
    step keeps R R^T = I; a loaded intervention holds R as a plain tensor (same forward).
    """

    def __init__(
        self, hidden: int, rank: int, dtype: torch.dtype, *, trainable: bool, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.rotate = nn.Linear(hidden, rank, bias=False, dtype=dtype)
        self.source = nn.Linear(hidden, rank, dtype=dtype)
        self.dropout = nn.Dropout(dropout)
        if trainable:
            nn.init.orthogonal_(self.rotate.weight)
            orthogonal(self.rotate, "weight")

    def delta(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden.to(self.source.weight.dtype)
        # Row-major R whether it comes from the orthogonal parametrisation (a transposed view)
        # or from a loaded file: the matmul kernels, and so the rounding, are then the same.
        rotation = self.rotate.weight.contiguous()
        return self.dropout((self.source(h) - h @ rotation.T) @ rotation)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "rotate": self.rotate.weight.detach(),
            "source.weight": self.source.weight.detach(),
            "source.bias": self.source.bias.detach(),
        }

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.rotate.weight.copy_(tensors["rotate"])
            self.source.weight.copy_(tensors["source.weight"])
            self.source.bias.copy_(tensors["source.bias"])


class DireftIntervention(nn.Module):
    """Phi(h) = h + W2^T (W1 h + b): the paper's DiReFT, no orthogonality, no difference term
    (pyreft's ``NodireftIntervention``; its ``DireftIntervention`` keeps W2 orthogonal)."""

    def __init__(
        self, hidden: int, rank: int, dtype: torch.dtype, *, trainable: bool, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, rank, bias=False, dtype=dtype)
        self.source = nn.Linear(hidden, rank, dtype=dtype)
        self.dropout = nn.Dropout(dropout)

    def delta(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden.to(self.source.weight.dtype)
        return self.dropout(self.source(h) @ self.proj.weight)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "proj": self.proj.weight.detach(),
            "source.weight": self.source.weight.detach(),
            "source.bias": self.source.bias.detach(),
        }

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.proj.weight.copy_(tensors["proj"])
            self.source.weight.copy_(tensors["source.weight"])
            self.source.bias.copy_(tensors["source.bias"])


_KINDS: dict[str, type[LoreftIntervention] | type[DireftIntervention]] = {
    "loreft": LoreftIntervention,
    "direft": DireftIntervention,
}


class ReftInterventions(nn.Module):
    """All interventions of one ReFT version: ``layers[str(layer)][slot]``."""

    def __init__(
        self, spec: InterventionSpec, *, trainable: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.spec = spec
        first, last = spec.first_last
        self.slots = intervention_slots(first, last, spec.share_weights)
        kind = _KINDS[spec.intervention]
        # Training keeps float32 master parameters (QR and the householder parametrisation
        # have no half-precision CPU kernels); the stored and loaded tensors use spec.dtype.
        self.dtype = getattr(torch, spec.dtype)
        dtype = torch.float32 if trainable else self.dtype
        self.layers = nn.ModuleDict(
            {
                str(layer): nn.ModuleDict(
                    {
                        slot: kind(
                            spec.hidden_size, spec.rank, dtype, trainable=trainable, dropout=dropout
                        )
                        for slot in self.slots
                    }
                )
                for layer in spec.layers
            }
        )

    def at(self, layer: int) -> nn.ModuleDict:
        return self.layers[str(layer)]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat ``layers.<layer>.<slot>.<name>`` -> tensor (R materialised), for safetensors."""
        out: dict[str, torch.Tensor] = {}
        for layer, slots in self.layers.items():
            for slot, module in slots.items():
                for name, tensor in module.tensors().items():
                    out[f"layers.{layer}.{slot}.{name}"] = tensor.to("cpu", self.dtype).contiguous()
        return out

    @classmethod
    def from_tensors(
        cls, spec: InterventionSpec, tensors: dict[str, torch.Tensor]
    ) -> ReftInterventions:
        """Plain (non-parametrised) interventions holding exactly the saved tensors."""
        interventions = cls(spec, trainable=False)
        expected = set(interventions.tensors())
        if set(tensors) != expected:
            missing = sorted(expected - set(tensors))
            extra = sorted(set(tensors) - expected)
            raise ValueError(
                f"intervention tensors do not match reft/config.json: missing {missing}, "
                f"unexpected {extra}"
            )
        for layer, slots in interventions.layers.items():
            for slot, module in slots.items():
                prefix = f"layers.{layer}.{slot}."
                module.load_tensors(
                    {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
                )
        return interventions.eval()

    def trainable_parameter_count(self) -> int:
        """Free parameters: R counts as rank x hidden (as pyreft and the paper count it)."""
        return sum(t.numel() for t in self.tensors().values())
