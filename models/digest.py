"""Content digests of model weights: caches are keyed by what the weights are, not by a path.

A tensor's hash is the sha256 of its one-tensor safetensors encoding (key ``tensor``), which is
also its blob address in the checkpoint store, so a loaded model and a stored version have the
same digest without reading anything back.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping

import torch
from safetensors.torch import save as safetensors_save

BLOB_TENSOR_KEY = "tensor"


# safetensors' dtype codes for the dtypes models hold; any other goes through its ``save``.
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def tensor_blob_parts(tensor: torch.Tensor) -> tuple[bytes, memoryview]:
    """The one-tensor safetensors encoding the store keeps, as its header and a view of the
    tensor's own bytes, so hashing or writing a tensor never copies it (safetensors' ``save``
    built the file in memory: twice a tensor's bytes while the largest one was hashed)."""
    dense = tensor.detach().cpu().contiguous()
    code = _SAFETENSORS_DTYPES.get(dense.dtype)
    if code is None:
        return safetensors_save({BLOB_TENSOR_KEY: dense}), memoryview(b"")
    flat = dense.reshape(-1)
    size = flat.numel() * flat.element_size()
    entry = {"dtype": code, "shape": list(tensor.shape), "data_offsets": [0, size]}
    header = json.dumps({BLOB_TENSOR_KEY: entry}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    data = memoryview(flat.view(torch.uint8).numpy()) if size else memoryview(b"")
    return struct.pack("<Q", len(header)) + header, data


def tensor_blob_bytes(tensor: torch.Tensor) -> bytes:
    """The safetensors encoding the store keeps for one tensor, in one bytes object."""
    header, data = tensor_blob_parts(tensor)
    return header + bytes(data)


def tensor_sha256(tensor: torch.Tensor) -> str:
    header, data = tensor_blob_parts(tensor)
    digest = hashlib.sha256(header)
    digest.update(data)
    return digest.hexdigest()


def digest_from_hashes(tensor_hashes: dict[str, str]) -> str:
    """Digest of a whole model from its per-tensor hashes (name order independent)."""
    h = hashlib.sha256()
    for name in sorted(tensor_hashes):
        h.update(f"{name}\0{tensor_hashes[name]}\n".encode())
    return h.hexdigest()


def files_digest(files: Mapping[str, bytes]) -> str:
    """Digest of named files (a tokenizer's, a config's): what a model is besides its weights."""
    return digest_from_hashes(
        {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    )


def combined_digest(*parts: str) -> str:
    """One digest of several (weights, config, tokenizer), in the order given."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def persistent_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` would write: tied duplicates (lm_head tied to the
    embedding) appear once, under the name that owns the storage."""
    tied = set(_tied_keys(model))
    seen: dict[tuple[int, int], str] = {}
    out: dict[str, torch.Tensor] = {}
    items = sorted(model.state_dict().items(), key=lambda kv: kv[0] in tied)
    for name, tensor in items:
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and key in seen:
            continue
        seen[key] = name
        out[name] = tensor
    return dict(sorted(out.items()))


def _tied_keys(model: torch.nn.Module) -> list[str]:
    keys = getattr(model, "_tied_weights_keys", None) or []
    return list(keys.keys()) if isinstance(keys, dict) else list(keys)


def model_digest(model: torch.nn.Module) -> str:
    """Content hash of a model's persistent tensors."""
    return digest_from_hashes(
        {name: tensor_sha256(t) for name, t in persistent_state_dict(model).items()}
    )
