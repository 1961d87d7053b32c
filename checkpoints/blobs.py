"""Content-addressed blobs: tensors (one safetensors file each) and raw files.

Concurrent writers of the same blob are harmless: same address, same bytes, atomic rename.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file as safetensors_load_file

from modelsurgery.checkpoints.atomic import atomic_write
from modelsurgery.checkpoints.codecs import DENSE, choose_encoding, get_codec
from modelsurgery.checkpoints.layout import StoreLayout
from modelsurgery.checkpoints.manifest import TensorEntry
from modelsurgery.models.digest import BLOB_TENSOR_KEY, tensor_blob_parts, tensor_sha256

_HASH_CHUNK = 1 << 20


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class BlobStore:
    def __init__(self, layout: StoreLayout) -> None:
        self.layout = layout

    def _put(self, path: Path, data: bytes | Sequence[bytes | memoryview]) -> None:
        if not path.exists():
            atomic_write(path, data, self.layout.tmp)

    def put_tensor(self, tensor: torch.Tensor, encoding: str | None = None) -> TensorEntry:
        """Store ``tensor`` (encoding: chosen by ``choose_encoding`` unless given). A dense
        blob is hashed and written from the tensor's own memory, never copied whole."""
        encoding = encoding or choose_encoding(tensor)
        if encoding == DENSE:
            header, view = tensor_blob_parts(tensor)
            digest = hashlib.sha256(header)
            digest.update(view)
            sha = digest.hexdigest()
            self._put(self.layout.tensor_blob(sha), [header, view])
        else:
            data = get_codec(encoding).encode(tensor)
            sha = hashlib.sha256(data).hexdigest()
            self._put(self.layout.tensor_blob(sha), data)
        return TensorEntry(
            blob=sha,
            dtype=dtype_name(tensor.dtype),
            shape=list(tensor.shape),
            encoding=encoding,
            digest=None if encoding == DENSE else tensor_sha256(tensor),
        )

    def put_file(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self._put(self.layout.file_blob(sha), data)
        return sha

    def tensor(self, entry: TensorEntry) -> torch.Tensor:
        """The dense tensor. A dense blob is read through safetensors' memory map, straight
        into the tensor (reading its bytes first held each tensor twice while it loaded)."""
        path = self.layout.tensor_blob(entry.blob)
        if entry.encoding == DENSE:
            return safetensors_load_file(path)[BLOB_TENSOR_KEY]
        return get_codec(entry.encoding).decode(path.read_bytes())

    def file(self, sha256: str) -> bytes:
        return self.layout.file_blob(sha256).read_bytes()

    def has_tensor(self, sha256: str) -> bool:
        return self.layout.tensor_blob(sha256).is_file()

    def has_file(self, sha256: str) -> bool:
        return self.layout.file_blob(sha256).is_file()

    def all_blobs(self) -> Iterator[tuple[Path, str]]:
        """Every stored blob with the sha256 its name claims."""
        for path in sorted(self.layout.blobs.glob("*/*")):
            yield path, path.name.split(".", 1)[0]
        for path in sorted(self.layout.files.glob("*/*")):
            yield path, path.name
