"""Per-head linear probes and the shifts ITI adds to the chosen heads (Li et al. 2023, sec. 3).

Every (layer, head) gets its own logistic-regression probe on the head's output (before the
attention output projection); all S = layers x heads probes train at once as one batched,
convex problem. Heads are ranked by the probes' accuracy on held-out texts; each chosen head
is shifted along a direction (the mass-mean shift by default, which the paper finds better
than the probe weight) by ``alpha`` times the standard deviation of the fit activations
along it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from modelsurgery.editing.contrast import projections

DirectionKind = Literal["mass_mean", "probe"]

# On standardized features: weight on the mean log-loss of 0.5 * ||w||^2 (keeps separable
# heads' weights finite), and LBFGS iterations (the problem converges in well under 100).
PROBE_L2 = 1e-2
PROBE_STEPS = 200


@dataclass(frozen=True)
class ProbeFit:
    """Fitted probes, one row per (layer, head) flattened to S = layers * heads.

    accuracy: (S,) held-out accuracy; loss: (S,) held-out mean log-loss;
    weight: (S, D) the probe's weight in activation units (points toward label 1);
    bias: (S,).
    """

    accuracy: torch.Tensor
    loss: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor


def fit_probes(
    fit_x: torch.Tensor,
    fit_y: torch.Tensor,
    held_x: torch.Tensor,
    held_y: torch.Tensor,
    *,
    l2: float = PROBE_L2,
    steps: int = PROBE_STEPS,
) -> ProbeFit:
    """fit_x: (N, S, D), fit_y: (N,) in {0, 1}; held_x: (M, S, D), held_y: (M,).

    The S problems are independent, so one LBFGS run on the sum of their objectives fits all
    of them. Convex with L2, it starts from zero and needs no seed.
    """
    if not bool((fit_y == 0).any() and (fit_y == 1).any()):
        raise ValueError("the fit texts need both labels (true and false)")
    x = fit_x.double()
    y = fit_y.double()
    # Standardize each feature on the fit texts, so one l2 and one step size suit every head.
    mean = x.mean(dim=0)  # (S, D)
    scale = x.std(dim=0).clamp_min(1e-6)  # (S, D)
    z = (x - mean) / scale  # (N, S, D)
    s, d = z.shape[1], z.shape[2]
    w = torch.zeros(s, d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(s, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=steps,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    target = y[:, None].expand(-1, s)  # (N, S)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = torch.einsum("nsd,sd->ns", z, w) + b  # (N, S)
        per_probe = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, target, reduction="none"
        ).mean(dim=0)  # (S,)
        loss = (per_probe + 0.5 * l2 * (w * w).sum(dim=1)).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    w, b = w.detach(), b.detach()
    # Back to activation units: w.(x - mean)/scale + b = (w/scale).x + (b - (w/scale).mean).
    weight = w / scale  # (S, D)
    bias = b - (weight * mean).sum(dim=1)  # (S,)
    held_logits = torch.einsum("msd,sd->ms", held_x.double(), weight) + bias  # (M, S)
    held_target = held_y.double()[:, None].expand(-1, s)
    accuracy = ((held_logits > 0).double() == held_target).double().mean(dim=0)  # (S,)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        held_logits, held_target, reduction="none"
    ).mean(dim=0)  # (S,)
    return ProbeFit(accuracy.float(), loss.float(), weight.float(), bias.float())


def rank_heads(fit: ProbeFit) -> list[int]:
    """Flat head indices, best first: higher held-out accuracy, ties broken by lower held-out
    log-loss (accuracy on a few held-out texts ties often), then by index."""
    accuracy, loss = fit.accuracy.tolist(), fit.loss.tolist()
    return sorted(range(len(accuracy)), key=lambda i: (-accuracy[i], loss[i], i))


def mass_mean_directions(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x: (N, S, D), y: (N,) -> (S, D): mean of the true (1) minus mean of the false (0)."""
    positive, negative = x[y == 1], x[y == 0]
    if not len(positive) or not len(negative):
        raise ValueError("the fit texts need both labels (true and false)")
    return (positive.double().mean(dim=0) - negative.double().mean(dim=0)).float()


def head_shifts(x: torch.Tensor, directions: torch.Tensor, alpha: float) -> torch.Tensor:
    """x: (N, S, D) fit activations, directions: (S, D) -> shifts (S, D).

    shift = alpha * sigma * unit direction, sigma the standard deviation of the activations'
    projections on the unit direction (so alpha is in units of the head's own spread).
    """
    unit = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (S, D)
    sigma = projections(x, unit).std(dim=0)  # (S,)
    return alpha * sigma[:, None] * unit
