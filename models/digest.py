"""Content digests of model weights: caches are keyed by what the weights are, not by a path.

A tensor's hash is the sha256 of its one-tensor safetensors encoding (key ``tensor``), which is
also its blob address in the checkpoint store, so a loaded model and a stored version have the
same digest without reading anything back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from safetensors.torch import save as safetensors_save

BLOB_TENSOR_KEY = "tensor"


def tensor_blob_bytes(tensor: torch.Tensor) -> bytes:
    """The safetensors encoding the store keeps for one tensor."""
    return safetensors_save({BLOB_TENSOR_KEY: tensor.detach().cpu().contiguous()})


def tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor_blob_bytes(tensor)).hexdigest()


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
