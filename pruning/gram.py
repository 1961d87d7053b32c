"""Gram matrices H = X^T X of a linear layer's calibration inputs, for the refit.

Each batch's product is taken in float32 and the batches are summed in float64. Under bfloat16
calibration on a CPU, inputs that arrive in bfloat16 (the attention output read by o, the MLP
hidden state read by down: the larger Gram matrices) are multiplied on the bfloat16 matrix units
(AMX): oneDNN's bfloat16 precision for a float32 product rounds the inputs to bfloat16 (exact
for these), accumulates in float32 and returns float32, so the result is the float32 product's
up to summation order (a bfloat16 result, or bfloat16 partial sums, would round every entry to
8 bits). Float32 inputs (the norms' outputs read by q/k/v and gate/up) keep float32 products:
rounding them to bfloat16 cost 5% of dev perplexity at 2:4 with 8 x 256 calibration tokens.
The float32 Gram products were the largest single cost of a default 2:4 job at 128 x 512
calibration tokens (docs/pruning.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def _bfloat16_products() -> Iterator[None]:
    """float32 CPU matrix products with bfloat16 inputs and float32 accumulation. The setting
    is process-wide: it is set only around the Gram product and restored after."""
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def uses_bfloat16_products(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Gram products run on bfloat16 inputs: bfloat16 calibration on a CPU whose
    oneDNN takes bfloat16 products (elsewhere, float32 products of the inputs as they come)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()


class GramSum:
    """X^T X summed over batches of inputs ([..., features]) in float64."""

    def __init__(self, size: int, device: torch.device, bfloat16_products: bool) -> None:
        self.bfloat16_products = bfloat16_products
        self.total = torch.zeros(size, size, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        with torch.autocast(flat.device.type, enabled=False):  # the product's dtype is ours
            if self.bfloat16_products and x.dtype == torch.bfloat16:
                with _bfloat16_products():
                    product = flat.T @ flat
            else:
                product = flat.T @ flat
        self.total += product
