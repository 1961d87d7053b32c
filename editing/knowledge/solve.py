"""Solves against the [in, in] float64 systems of knowledge edits (ROME's C^-1 k, MEMIT's
(lambda C + K^T K)^-1), holding one such matrix: the system is built once and factored by
Cholesky in its own memory, then each right-hand side costs two triangular solves.
``torch.linalg.solve`` on ``lambda * C + K^T K`` held the scaled C, the product, their sum and
the LU factors at once: four matrices of in^2 float64 (0.25 GB each at in = 5,632).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class SpdSolve:
    """x = A^-1 b for a symmetric positive definite A that ``build`` returns (a fresh tensor
    this object may overwrite). An A that is not positive definite in floating point (an
    ill-conditioned C) is built again and solved through LU instead."""

    def __init__(self, build: Callable[[], torch.Tensor]) -> None:
        factor = build()
        info = torch.empty((), dtype=torch.int32, device=factor.device)
        torch.linalg.cholesky_ex(factor, out=(factor, info))
        self._pivots: torch.Tensor | None = None
        if int(info):
            del factor
            factor, self._pivots = torch.linalg.lu_factor(build())
        self._factor = factor

    def __call__(self, rhs: torch.Tensor) -> torch.Tensor:
        """A^-1 rhs for rhs [in] or [in, m], in A's dtype and device."""
        b = rhs.to(self._factor)
        columns = b[:, None] if b.dim() == 1 else b
        if self._pivots is None:
            x = torch.cholesky_solve(columns, self._factor)
        else:
            x = torch.linalg.lu_solve(self._factor, self._pivots, columns)
        return x[:, 0] if b.dim() == 1 else x


def with_ridge(mom2: torch.Tensor, relative: float = 1e-6) -> torch.Tensor:
    """A copy of C plus ``relative`` times its mean diagonal on the diagonal: a C from few
    calibration tokens is singular, and the ridge keeps its solves finite."""
    system = mom2.to(torch.float64, copy=True)
    system.diagonal().add_(relative * mom2.diagonal().mean())
    return system
