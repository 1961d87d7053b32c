"""Freed tensor memory handed back to the operating system.

glibc serves allocations under its dynamic mmap threshold (up to 32 MiB: a bfloat16 copy of a
2048 x 5632 matrix, a 2048 x 2048 float32 one) from its heap, and keeps what is freed there for
later allocations: after v* in bfloat16 let go of its cast copies, a 0.8B model's worker kept
over a gigabyte it no longer used. ``malloc_trim(0)`` returns the free pages of every arena.
Called where a job phase has just dropped large tensors; a no-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def give_back_freed_memory() -> None:
    """Return the heap's free pages to the system (glibc ``malloc_trim(0)``)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
