"""Loaded base models kept warm, least recently used first out, bounded by parameter bytes.

Keyed by model digest (what the weights are), with a second map from the reference a job named
to that digest, so the second job on one model neither reloads nor re-hashes it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class CachedModel:
    model: torch.nn.Module
    tokenizer: Any
    digest: str
    version_id: str
    nbytes: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Held while the model is copied or has hooks attached (ReFT generation)."""


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


class ModelCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, CachedModel] = OrderedDict()
        self._by_reference: dict[str, str] = {}
        self._lock = threading.RLock()
        self._loading: dict[str, threading.Lock] = {}
        self.hits = 0
        self.misses = 0

    def get_or_load(self, reference: str, load: Callable[[], CachedModel]) -> CachedModel:
        """The cached model for a reference, loading it (once, even under concurrency)."""
        with self._lock:
            lock = self._loading.setdefault(reference, threading.Lock())
        with lock:
            with self._lock:
                digest = self._by_reference.get(reference)
                if digest is not None and digest in self._entries:
                    self._entries.move_to_end(digest)
                    self.hits += 1
                    return self._entries[digest]
            entry = load()
            with self._lock:
                self.misses += 1
                self._by_reference[reference] = entry.digest
                existing = self._entries.get(entry.digest)
                if existing is not None:
                    self._entries.move_to_end(entry.digest)
                    return existing
                self._entries[entry.digest] = entry
                self._evict()
                return entry

    def remember(self, reference: str, digest: str) -> None:
        """Name a cached model by one more reference (a model reference's imported version)."""
        with self._lock:
            if digest in self._entries:
                self._by_reference[reference] = digest

    def _evict(self) -> None:
        while len(self._entries) > 1 and self.total_bytes() > self.max_bytes:
            digest, _ = self._entries.popitem(last=False)
            for ref in [r for r, d in self._by_reference.items() if d == digest]:
                del self._by_reference[ref]

    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def digests(self) -> list[str]:
        with self._lock:
            return list(self._entries)
