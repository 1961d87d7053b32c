"""Null-space projected updates (AlphaEdit, Fang et al. 2024): an edit that cannot disturb the
preserved knowledge, because it only acts on key directions that knowledge does not use.

The preserved knowledge of a layer is summarised by its keys' second moment C = E[k k^T]
(``stats``). Its eigenvectors with small eigenvalues span the directions those keys (almost)
never take; U [in, r] collects them and P = U U^T projects onto that null space. An update of
the form Delta = D P gives Delta k0 = D P k0 ~ 0 for every preserved key k0, so the preserved
term of MEMIT's objective (lambda * ||Delta K0||^2) drops out and only the new keys K, the keys
of earlier edits K_p (sequential editing: they must keep what they were given) and a ridge
remain. A real model's C has no exact null space (see ``null_space``), so the preserved term
can be kept on what is left of it, lambda * U^T C U (``mom2_weight``): zero for an exact null
space (AlphaEdit's update), MEMIT's own regulariser restricted to the null space otherwise.
Everything here works in U's coordinates (r <= in), where P is the identity, in float64.

The eigendecomposition is cached beside the statistics file it comes from (same key digest,
same calibration settings), so a chain of edits decomposes each layer's C once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .stats import LayerStatistics, save_atomically


@dataclass(frozen=True)
class NullSpace:
    """basis: U [in, r], orthonormal columns (float64); values: C's eigenvalues along them [r]
    (U^T C U = diag(values): what the preserved keys still put there); scale: C's median
    eigenvalue, the unit
    the threshold and the ridge are given in (a typical direction's key energy; the mean is
    dominated by the few outlier dimensions of LLM activations: 80.6 against a median of
    0.0045 in SmolLM2-135M's layer 2)."""

    basis: torch.Tensor
    values: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.basis.shape[1]


def projection_record(
    threshold: float, ridge: float, mom2_weight: float, layers: dict[str, dict[str, int]]
) -> dict[str, object]:
    """What a projected edit records in its ``resolved`` config (``null_space``): the
    settings it ran with and, per layer, the null space's rank and the preserved keys kept."""
    return {"threshold": threshold, "l2": ridge, "mom2_weight": mom2_weight, "layers": layers}


def eigen_path(stats: LayerStatistics) -> Path:
    return stats.path.with_name(stats.path.name.removesuffix(".safetensors") + ".eigh.safetensors")


def eigendecomposition(stats: LayerStatistics) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues [in] ascending, eigenvectors [in, in] as columns) of C, cached on disk."""
    path = eigen_path(stats)
    if path.exists():
        cached = load_file(str(path))
        return cached["values"], cached["vectors"]
    values, vectors = torch.linalg.eigh(stats.mom2.double())
    save_atomically(path, {"values": values, "vectors": vectors})
    return values, vectors


def null_space(stats: LayerStatistics, threshold: float) -> NullSpace:
    """The eigenvectors of C whose eigenvalue is below ``threshold`` times C's median
    eigenvalue (a relative cut, so one setting fits models whose activations differ in scale;
    AlphaEdit cuts at an absolute 2e-2 on GPT-J and Llama3-8B). C of a real model is full rank
    (SmolLM2-135M, 65k calibration tokens: the smallest eigenvalue is 0.27 to 0.37 of the
    median in layers 2-8), so this null space is approximate: preserved keys keep the small
    share of their energy that lies below the cut."""
    values, vectors = eigendecomposition(stats)
    scale = float(values.median())
    below = values < threshold * scale
    if not bool(below.any()):
        raise ValueError(
            f"nullspace_threshold: no direction of layer {stats.layer}'s keys has an eigenvalue "
            f"below {threshold:g} x the median (the smallest is {float(values[0]) / scale:.3g} x); "
            "raise it"
        )
    return NullSpace(vectors[:, below], values[below], scale)


def projected_update(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    space: NullSpace,
    preserved_gram: torch.Tensor | None,
    ridge: float,
    mom2_weight: float = 0.0,
) -> torch.Tensor:
    """MEMIT's update restricted to the null space, [out, in] (float64).

    AlphaEdit's objective: min_D ||D P K^T - R^T||^2 + ||D P K_p^T||^2 + ridge * ||D P||^2
    (+ mom2_weight * ||D P K0||^2, the preserved keys' share left in the null space), whose
    normal equations give Delta = D P = R^T K P (K_p^T K_p P + K^T K P + ridge I)^-1.
    With P = U U^T the push-through identity U^T (S U U^T + ridge I)^-1 = (U^T S U +
    ridge I_r)^-1 U^T turns it into an r x r symmetric positive definite system.
    ``ridge`` is in units of ``space.scale``."""
    u = space.basis  # [in, r]
    # 1. The new keys in null-space coordinates: K U [F, r].
    k = keys.double().to(u.device) @ u
    # 2. What the update must not disturb beyond the preserved knowledge (already out of the
    #    null space): the keys of earlier edits, U^T K_p^T K_p U [r, r], plus the new keys'
    #    own U^T K^T K U [r, r] (the least-squares fit), the ridge and lambda * U^T C U, which
    #    is diagonal in this basis (U are eigenvectors of C).
    system = k.T @ k + torch.diag(mom2_weight * space.values + ridge * space.scale).to(u.device)
    if preserved_gram is not None:
        system += u.T @ preserved_gram.double().to(u.device) @ u
    # 3. Solve (U^T S U + ridge I) X = U^T K^T R for X [r, out] (Cholesky: the system is SPD).
    rhs = k.T @ residuals.double().to(u.device)
    x = torch.cholesky_solve(rhs, torch.linalg.cholesky(system))
    # 4. Back to the input basis: Delta = X^T U^T [out, in]; Delta k0 = 0 for k0 outside U.
    return (u @ x).T.to(keys.device)


def projected_rank_one(
    key: torch.Tensor,
    delta: torch.Tensor,
    space: NullSpace,
    preserved_gram: torch.Tensor | None,
    ridge: float,
    mom2_weight: float = 0.0,
) -> torch.Tensor:
    """ROME's one-fact update restricted to the null space, [out, in] (float64).

    ROME asks for W' k = W k + delta exactly while disturbing as little else as it can. Here
    "else" is the preserved knowledge (out of reach: Delta = delta u^T with u in U's span) and
    the earlier edits' keys (and, weighted by ``mom2_weight``, the preserved keys' share left
    in the null space), so u minimises u^T M u along the constraint, M = U^T (K_p^T K_p +
    mom2_weight C + ridge I) U: u = U M^-1 U^T k, Delta = delta u^T / (u^T k), hence Delta k =
    delta. With neither, u is simply P k, the shortest update along the null space."""
    u_basis = space.basis  # [in, r]
    # 1. The key in null-space coordinates, U^T k [r]; none of it there = nothing to edit.
    k = key.double().to(u_basis.device)
    coords = u_basis.T @ k
    if float(coords.norm()) <= 1e-6 * float(k.norm()):
        raise ValueError(
            "nullspace_threshold: the subject's key lies in the preserved keys' span "
            "(no null-space component to edit along); raise the threshold"
        )
    # 2. The metric the direction is chosen under: earlier keys, lambda C, ridge [r, r].
    metric = torch.diag(mom2_weight * space.values + ridge * space.scale).to(k.device)
    if preserved_gram is not None:
        metric += u_basis.T @ preserved_gram.double().to(k.device) @ u_basis
    # 3. u = U M^-1 U^T k [in]: the cheapest direction (under M) that still reads k.
    u = u_basis @ torch.cholesky_solve(coords[:, None], torch.linalg.cholesky(metric))[:, 0]
    # 4. Rank one, scaled so the key's output moves by exactly delta.
    return (torch.outer(delta.double().to(k.device), u) / torch.dot(u, k)).to(key.device)
