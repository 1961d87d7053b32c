"""How a tensor blob encodes its tensor.

Every blob is a safetensors file addressed by the sha256 of its bytes; the manifest entry's
``encoding`` names the codec that turns those bytes back into the dense tensor. ``dense`` is the
one-tensor encoding of :func:`modelsurgery.models.digest.tensor_blob_bytes`, whose hash is also
the tensor's digest. ``sparse-bitmask`` (see ``sparse``) keeps pruned weights compactly; its
entries carry the dense digest apart, so a version's digest does not depend on its encoding.
"""

from __future__ import annotations

from typing import Protocol

import torch
from safetensors.torch import load as safetensors_load

from modelsurgery.checkpoints.sparse import SPARSE_BITMASK, BitmaskCodec, worth_sparse
from modelsurgery.models.digest import BLOB_TENSOR_KEY, tensor_blob_bytes

DENSE = "dense"


class TensorCodec(Protocol):
    name: str

    def encode(self, tensor: torch.Tensor) -> bytes: ...

    def decode(self, data: bytes) -> torch.Tensor: ...


class DenseCodec:
    name = DENSE

    def encode(self, tensor: torch.Tensor) -> bytes:
        return tensor_blob_bytes(tensor)

    def decode(self, data: bytes) -> torch.Tensor:
        return safetensors_load(data)[BLOB_TENSOR_KEY]


_CODECS: dict[str, TensorCodec] = {DENSE: DenseCodec(), SPARSE_BITMASK: BitmaskCodec()}


def choose_encoding(tensor: torch.Tensor) -> str:
    """``sparse-bitmask`` where it saves a quarter of the bytes or more, else ``dense``."""
    return SPARSE_BITMASK if worth_sparse(tensor) else DENSE


def register_codec(codec: TensorCodec) -> None:
    _CODECS[codec.name] = codec


def get_codec(name: str) -> TensorCodec:
    try:
        return _CODECS[name]
    except KeyError:
        raise ValueError(f"unknown tensor encoding {name!r}; known: {sorted(_CODECS)}") from None
