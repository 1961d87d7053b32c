"""The model v* is optimised through: a copy in the optimisation dtype (bfloat16 where its
matmuls are fast), so the edit's most expensive part runs at the hardware's best speed.

Only the deltas come out of that copy. Keys, the original outputs v* is added to and the
weight update are computed on the model itself, in its own dtype, so bf16 rounding enters
the weights only through the direction the optimisation found. On CPU the attention runs
through SDPA's math kernel: the flash kernel's backward in bf16 took 4x its float32 time
(torch 2.13, AMD EPYC with AVX-512-BF16, 2 threads), the math kernel's did not.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from modelsurgery.editing.registry import DtypeSetting
from modelsurgery.models.hardware import resolve_dtype


def optimisation_dtype(model: nn.Module, setting: DtypeSetting) -> torch.dtype:
    return resolve_dtype(setting, next(model.parameters()).device)


def optimisation_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` itself when it already has ``dtype``, else a frozen copy cast to it."""
    if next(model.parameters()).dtype == dtype:
        return model
    return copy.deepcopy(model).to(dtype)


@contextmanager
def optimisation_kernels(model: nn.Module) -> Iterator[None]:
    """SDPA's math kernel on CPU while v* optimises (see the module docstring)."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    with sdpa_kernel(SDPBackend.MATH) if on_cpu else nullcontext():
        yield
