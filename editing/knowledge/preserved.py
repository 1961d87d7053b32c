"""The keys of every fact written into a layer along a version's lineage, stored with each
version that edits knowledge, so the next projected edit on it keeps them (sequential editing).

One artifact, ``knowledge/preserved_keys.safetensors``, holds per edited down projection either
the keys themselves (``keys.<module>`` [n, in], while n is below the layer's input width) or
their accumulated Gram matrix K_p^T K_p (``gram.<module>`` [in, in], once that is smaller),
with the fact count (``count.<module>``). Each version stores the whole accumulated set (its
parent's plus its own facts), so a job reads one file. It is a plain artifact, not a hook:
nothing attaches it at load, a version carrying it is not a leaf, and an export carries it in a
subfolder that ``from_pretrained`` ignores. It is written whether or not the edit was projected,
so a later projected edit can use it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

PRESERVED_KEYS_ARTIFACT = "knowledge/preserved_keys.safetensors"
Report = Callable[..., None]


class PreservedKeys:
    """Earlier edits' keys per module path; ``add`` appends this job's, ``to_bytes`` stores."""

    def __init__(self) -> None:
        self._keys: dict[str, torch.Tensor] = {}
        self._grams: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    @classmethod
    def from_bytes(cls, data: bytes | None) -> PreservedKeys:
        found = cls()
        if data is None:
            return found
        for name, tensor in safetensors_load(data).items():
            kind, module = name.split(".", 1)
            if kind == "keys":
                found._keys[module] = tensor.double()
            elif kind == "gram":
                found._grams[module] = tensor.double()
            elif kind == "count":
                found._counts[module] = int(tensor.item())
        return found

    def count(self, module: str) -> int:
        return self._counts.get(module, 0)

    def gram(self, module: str, width: int, report: Report | None = None) -> torch.Tensor | None:
        """K_p^T K_p [width, width] (float64) of the earlier edits of ``module``, or None. Keys
        of another width (the layer was pruned since) no longer apply and are dropped."""
        stored = self._keys.get(module, self._grams.get(module))
        if stored is None:
            return None
        if stored.shape[-1] != width:
            if report is not None:
                report(
                    "preserved keys: width changed, dropped",
                    module=module,
                    stored=stored.shape[-1],
                    width=width,
                )
            self.drop(module)
            return None
        return stored.T @ stored if module in self._keys else stored

    def drop(self, module: str) -> None:
        for table in (self._keys, self._grams, self._counts):
            table.pop(module, None)

    def add(self, module: str, keys: torch.Tensor) -> None:
        """Append ``keys`` [F, in] (this edit's facts) to ``module``'s set."""
        new = keys.detach().double().cpu()
        width = new.shape[1]
        if module in self._grams:
            self._grams[module] = self._grams[module] + new.T @ new
        else:
            joined = torch.cat([self._keys[module], new]) if module in self._keys else new
            if joined.shape[0] < width:
                self._keys[module] = joined
            else:
                self._keys.pop(module, None)
                self._grams[module] = joined.T @ joined
        self._counts[module] = self.count(module) + new.shape[0]

    def to_bytes(self) -> bytes:
        tensors: dict[str, torch.Tensor] = {}
        for module, keys in self._keys.items():
            tensors[f"keys.{module}"] = keys.float().contiguous()
        for module, gram in self._grams.items():
            tensors[f"gram.{module}"] = gram.float().contiguous()
        for module, count in self._counts.items():
            tensors[f"count.{module}"] = torch.tensor([count], dtype=torch.int64)
        return safetensors_save(tensors, metadata={"format": "modelsurgery.preserved_keys.v1"})
