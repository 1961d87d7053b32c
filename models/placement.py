"""Where a worker puts a model: on one device, or its layers over several, with CPU offload.

A worker may own several GPUs (``--gpus-per-worker``). A model that fits the first keeps today's
single-device path (no hooks). One that does not is placed layer by layer with accelerate's
``infer_auto_device_map`` (decoder blocks never split: ``_no_split_modules``), filling the
devices in order, and dispatched with ``dispatch_model``: each block's hook moves its inputs to
the block's device, so a forward pass (and a method's activations) happen where the weights
live.

Offload here means *resident*: blocks that fit none of the devices stay in CPU memory and run on
the CPU (``main_device="cpu"`` in ``dispatch_model``), instead of accelerate's streamed offload,
which keeps weights on the meta device and copies them in at each forward. Every method edits
weights in place, and a streamed weight has no tensor to write; a resident one does. Disk
offload is refused for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import psutil
import torch
from torch import nn

CPU = "cpu"
# Of a GPU's free memory, what a placement may fill with weights: the rest is left to
# activations, a job's changed tensors and the allocator's fragmentation.
GPU_WEIGHT_SHARE = 0.85


class PlacementError(ValueError):
    """The model cannot be placed on the worker's devices as configured."""


@dataclass(frozen=True)
class Placement:
    """The devices a worker's models go on, in order (the first one takes the inputs and, for
    a model that fits it, everything); each one's budget for weights in bytes (None: what the
    device has free, x ``GPU_WEIGHT_SHARE`` for a GPU); whether blocks that fit none of them
    may stay in CPU memory (at most ``cpu_memory`` bytes, None: what is available) and run
    there; and the per-GPU budget ``on_gpus`` gives each GPU (None: what it has free)."""

    devices: tuple[str, ...] = (CPU,)
    max_memory: tuple[int, ...] | None = None
    cpu_offload: bool = False
    cpu_memory: int | None = None
    gpu_memory: int | None = None

    def __post_init__(self) -> None:
        if not self.devices:
            raise PlacementError("a placement needs at least one device")
        if self.max_memory is not None and len(self.max_memory) != len(self.devices):
            raise PlacementError(
                f"max_memory gives {len(self.max_memory)} budgets for {len(self.devices)} devices"
            )

    @property
    def main(self) -> str:
        return self.devices[0]

    @property
    def single(self) -> bool:
        """Whether every model simply goes on the one device (today's path): one device, no
        budget, and no offload to speak of (a CPU device is where offload would go)."""
        return (
            len(self.devices) == 1
            and self.max_memory is None
            and (not self.cpu_offload or self.main == CPU)
        )

    def budgets(self) -> dict[int | str, int]:
        """accelerate's ``max_memory``: device slots 0..n-1 (mapped to ``devices`` after), and
        ``cpu`` when offload is allowed."""
        given = self.max_memory or tuple(_free_bytes(device) for device in self.devices)
        budgets: dict[int | str, int] = dict(enumerate(given))
        if self.cpu_offload:
            budgets[CPU] = self.cpu_memory or psutil.virtual_memory().available
        return budgets


def _free_bytes(device: str) -> int:
    parsed = torch.device(device)
    if parsed.type == "cuda":
        free, _total = torch.cuda.mem_get_info(parsed)
        return int(free * GPU_WEIGHT_SHARE)
    return psutil.virtual_memory().available


def device_map(model: nn.Module, placement: Placement) -> dict[str, str]:
    """Module name -> device for ``model`` on ``placement``; ``{"": device}`` when it all goes on
    one device."""
    if placement.single:
        return {"": placement.main}
    from accelerate import infer_auto_device_map

    slots = infer_auto_device_map(
        model,
        max_memory=placement.budgets(),
        no_split_module_classes=list(getattr(model, "_no_split_modules", None) or []),
    )
    names = {i: device for i, device in enumerate(placement.devices)}
    names[CPU] = CPU
    unplaced = [name for name, slot in slots.items() if slot not in names]
    if unplaced:
        where = "" if placement.cpu_offload else " (CPU offload is off)"
        raise PlacementError(
            f"the model does not fit the worker's {len(placement.devices)} device(s){where}: "
            f"{len(unplaced)} module(s) left over, first {unplaced[0]!r}"
        )
    placed = {name: names[slot] for name, slot in slots.items()}
    if len(set(placed.values())) == 1:
        return {"": next(iter(placed.values()))}
    return placed


def spread_over_devices(model: nn.Module) -> bool:
    """Whether ``place`` put ``model`` over more than one device."""
    return len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1


def place(model: nn.Module, placement: Placement) -> dict[str, str]:
    """Put ``model`` on ``placement``'s devices (see the module docstring); returns the map,
    which is also ``model.hf_device_map`` as transformers records it."""
    mapping = device_map(model, placement)
    if set(mapping) == {""}:
        model.to(mapping[""])
        return mapping
    from accelerate import dispatch_model

    dispatch_model(model, mapping, main_device=CPU)
    return mapping


def on_gpus(placement: Placement, count: int) -> Placement:
    """``placement`` moved to the ``count`` GPUs Ray gave the worker (its visible devices),
    each with ``gpu_memory`` for weights when set."""
    budgets = None if placement.gpu_memory is None else (placement.gpu_memory,) * count
    return replace(placement, devices=tuple(f"cuda:{i}" for i in range(count)), max_memory=budgets)
