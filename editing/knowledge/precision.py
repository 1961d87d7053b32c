"""The precision v* is optimised in: bfloat16 where its matmuls are fast, so the edit's most
expensive part runs at the hardware's best speed, without a second copy of the model.

v* runs only the layers from the edited one up, the final norm and the LM head (``runner``:
the prefix is computed once, below it nothing runs per step). ``optimisation_precision`` casts
those matrices alone, for the optimisation only: each parameter's float32 tensor is set aside
(``MethodContext.set_aside``) and a bfloat16 one put in its place, and the float32 ones are put
back after, untouched (no round trip through bfloat16). Autocast joins the cast layers to the
rest (the cached prefix, the delta, the losses). On the server a float32 tensor the job has not
written is let go meanwhile and read back from the store's memory map after, so the cast layers
cost less than they held (half their bytes, instead of half on top of all of them); tensors the
job already wrote are kept, and then the transient cost is their bfloat16 copies.

Keys, the original outputs v* is added to and the weight update are computed on the model in
its own dtype, so bf16 rounding enters the weights only through the direction the optimisation
found. On CPU the attention runs through SDPA's math kernel: the flash kernel's backward in bf16
took 4x its float32 time (torch 2.13, AMD EPYC with AVX-512-BF16, 2 threads), the math kernel's
did not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from modelsurgery.editing.registry import DtypeSetting, PutBack, keep_aside
from modelsurgery.models.adapters import get_adapter
from modelsurgery.models.hardware import resolve_dtype
from modelsurgery.models.memory import give_back_freed_memory


def optimisation_dtype(model: nn.Module, setting: DtypeSetting) -> torch.dtype:
    return resolve_dtype(setting, next(model.parameters()).device)


def _run_by_vstar(model: nn.Module, layer: int) -> list[nn.Parameter]:
    """The parameters v* runs each step: layers ``layer`` and up, the final norm, the head.
    Only matrices are cast: autocast casts a matmul's bias with it, while norms keep float32
    parameters (CPU's layer norm refuses a bfloat16 weight on float32 input)."""
    adapter = get_adapter(model)
    modules = [*adapter.layers()[layer:], adapter.final_norm(), adapter.lm_head()]
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for parameter in module.parameters():
            seen.setdefault(id(parameter), parameter)
    return list(seen.values())


@contextmanager
def optimisation_precision(
    model: nn.Module,
    dtype: torch.dtype,
    layer: int,
    set_aside: Callable[[nn.Parameter], PutBack] = keep_aside,
) -> Iterator[None]:
    """While the block runs, the weights v* runs from ``layer`` up are in ``dtype`` and autocast
    joins them to the rest; afterwards the model is exactly as before (module docstring)."""
    device = next(model.parameters()).device
    with ExitStack() as stack:
        stack.callback(give_back_freed_memory)  # runs last: the cast copies are gone by then
        if device.type != "cuda":
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        if next(model.parameters()).dtype != dtype:
            cast = [p for p in _run_by_vstar(model, layer) if p.is_floating_point() and p.dim() > 1]
            for parameter in cast:
                stack.callback(set_aside(parameter))
                parameter.data = parameter.data.to(dtype)
            stack.enter_context(torch.autocast(device.type, dtype=dtype))
        yield
