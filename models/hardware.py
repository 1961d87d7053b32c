"""What the device can do fast, so dtype defaults follow the hardware instead of the machine a
default was tuned on.

bfloat16 matmuls are fast on CUDA devices that support bf16 and on CPUs with native bf16 dot
products (AMX or AVX-512-BF16). Elsewhere (an AVX2-only CPU) oneDNN emulates them, about 40x
slower than float32, so ``auto`` means float32 there.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from modelsurgery.editing.registry import DtypeSetting


@dataclass(frozen=True)
class CpuCapability:
    model: str
    isa: str
    avx512_bf16: bool
    amx: bool

    @property
    def fast_bf16(self) -> bool:
        return self.avx512_bf16 or self.amx


def _cpu_model_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_capability() -> CpuCapability:
    """The CPU's model name, the ISA torch dispatches to, and its native bf16 support."""
    probe = torch.cpu
    return CpuCapability(
        model=_cpu_model_name(),
        isa=torch.backends.cpu.get_cpu_capability(),
        avx512_bf16=bool(probe._is_avx512_bf16_supported()),
        amx=bool(probe._is_amx_tile_supported()),
    )


def fast_bf16(device: torch.device | str) -> bool:
    """Whether bfloat16 matmuls on ``device`` run at least as fast as float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_capability().fast_bf16
    return False


def resolve_dtype(setting: DtypeSetting, device: torch.device | str) -> torch.dtype:
    """``auto`` -> bfloat16 where it is fast on ``device``, else float32."""
    if setting == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    return getattr(torch, setting)


def describe(device: torch.device | str = "cpu") -> str:
    """One line for benchmark headers: the device and what its dtype defaults resolve to."""
    device = torch.device(device)
    cpu = cpu_capability()
    parts = [
        f"device {device.type}",
        f"cpu {cpu.model!r}",
        f"isa {cpu.isa}",
        f"avx512_bf16 {cpu.avx512_bf16}",
        f"amx {cpu.amx}",
        f"threads {torch.get_num_threads()}",
    ]
    if device.type == "cuda" and torch.cuda.is_available():
        parts.append(f"gpu {torch.cuda.get_device_name(device)!r}")
    parts.append(f"auto dtype {str(resolve_dtype('auto', device)).removeprefix('torch.')}")
    return ", ".join(parts)
