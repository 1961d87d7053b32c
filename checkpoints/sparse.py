"""Bitmask encoding of sparse tensors (pruned weights), so a 50% or 2:4 pruned version costs
about half its dense bytes in the store.

Layout: one safetensors file holding ``mask`` (uint8, one bit per element, little-endian bit
order, row-major) and ``values`` (the kept elements in the tensor's own dtype, row-major), with
the shape in the metadata. A negative zero counts as kept, so decoding gives back the exact
dense bytes and the tensor's digest is unchanged. Export always writes dense tensors.

Per element this costs 1 bit plus ``itemsize`` bytes for each kept value: for float32 at 50%
sparsity 2.125 bytes instead of 4; for 2:4 the same (a 2-bit index per kept value is no
smaller than a bitmask at 50%).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

SPARSE_BITMASK = "sparse-bitmask"

# Encode sparsely only when that saves at least this share of the dense bytes.
MIN_SAVING = 0.25
MIN_ELEMENTS = 4096


def kept(flat: torch.Tensor) -> torch.Tensor:
    """Elements whose bytes are not +0.0 (a -0.0 is kept to stay lossless)."""
    return (flat != 0) | torch.signbit(flat)


def sparse_nbytes(numel: int, nonzero: int, itemsize: int) -> int:
    return (numel + 7) // 8 + nonzero * itemsize


def worth_sparse(tensor: torch.Tensor) -> bool:
    """Whether the bitmask encoding is at least ``MIN_SAVING`` smaller than dense."""
    if not tensor.is_floating_point() or tensor.numel() < MIN_ELEMENTS:
        return False
    nonzero = int(kept(tensor.detach().reshape(-1)).sum())
    dense = tensor.numel() * tensor.element_size()
    return sparse_nbytes(tensor.numel(), nonzero, tensor.element_size()) <= (1 - MIN_SAVING) * dense


def header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors buffer (8-byte little-endian header length, then
    the JSON header)."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]).get("__metadata__", {})


class BitmaskCodec:
    name = SPARSE_BITMASK

    def encode(self, tensor: torch.Tensor) -> bytes:
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        mask = kept(flat)
        packed = torch.from_numpy(np.packbits(mask.numpy(), bitorder="little"))
        return safetensors_save(
            {"mask": packed, "values": flat[mask].contiguous()},
            metadata={"shape": json.dumps(list(tensor.shape))},
        )

    def decode(self, data: bytes) -> torch.Tensor:
        parts = safetensors_load(data)
        shape = json.loads(header_metadata(data)["shape"])
        numel = int(np.prod(shape, dtype=np.int64))
        bits = np.unpackbits(parts["mask"].numpy(), count=numel, bitorder="little")
        mask = torch.from_numpy(bits.astype(bool))
        values = parts["values"]
        out = torch.zeros(numel, dtype=values.dtype)
        out[mask] = values
        return out.reshape(shape)
