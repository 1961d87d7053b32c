"""Loaded base models kept warm, least recently used first out, bounded by parameter bytes.

An entry is keyed by what a job sees: the weights, the config and the tokenizer (``digest``),
never by the weights alone, or two folders with the same weights and different tokenizers (chat
templates) would be one model. Entries whose weights and config are equal (``module_digest``)
share one module in memory and its lock. A second map names each entry by the references jobs
gave (a model reference, a version id), each with the version it stands for: several versions
can share one entry (a hook version and its parent, a revert), so ``get_or_load`` answers with a
view of the entry carrying the version asked for.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass
class CachedModel:
    model: torch.nn.Module
    tokenizer: Any
    digest: str
    """Weights, config and tokenizer: what the cache and per-model caches key by."""
    version_id: str
    nbytes: int
    module_digest: str = ""
    """Weights and config: entries equal in it share ``model`` and ``lock``."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Held by a job for its whole run (it edits the model in place and puts it back), and by
    Generate and evaluations while they read it (they attach hooks)."""


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


class ModelCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, CachedModel] = OrderedDict()
        self._by_reference: dict[str, tuple[str, str]] = {}  # -> (digest, version id)
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
                known = self._by_reference.get(reference)
                if known is not None and known[0] in self._entries:
                    digest, version_id = known
                    self._entries.move_to_end(digest)
                    self.hits += 1
                    return replace(self._entries[digest], version_id=version_id)
            loaded = load()
            with self._lock:
                self.misses += 1
                self._by_reference[reference] = (loaded.digest, loaded.version_id)
                entry = self._entries.get(loaded.digest)
                if entry is None:
                    entry = self._entries[loaded.digest] = self._sharing_module(loaded)
                    self._evict()
                self._entries.move_to_end(loaded.digest)
                return replace(entry, version_id=loaded.version_id)

    def _sharing_module(self, loaded: CachedModel) -> CachedModel:
        """``loaded`` on the module (and lock) of an entry with its weights and config, if any:
        the copy just loaded is dropped."""
        for entry in self._entries.values():
            if loaded.module_digest and entry.module_digest == loaded.module_digest:
                return replace(loaded, model=entry.model, lock=entry.lock)
        return loaded

    def remember(self, reference: str, entry: CachedModel) -> None:
        """Name a cached model by one more reference (a model reference's imported version)."""
        with self._lock:
            if entry.digest in self._entries:
                self._by_reference[reference] = (entry.digest, entry.version_id)

    def discard(self, digest: str) -> None:
        """Forget an entry (a warm model a job could not put back): the next request loads it
        afresh."""
        with self._lock:
            self._entries.pop(digest, None)
            for ref in [r for r, (d, _) in self._by_reference.items() if d == digest]:
                del self._by_reference[ref]

    def _evict(self) -> None:
        while len(self._entries) > 1 and self.total_bytes() > self.max_bytes:
            self.discard(next(iter(self._entries)))

    def total_bytes(self) -> int:
        """Bytes of the distinct modules held (entries sharing one count it once)."""
        with self._lock:
            return sum({id(e.model): e.nbytes for e in self._entries.values()}.values())

    def digests(self) -> list[str]:
        with self._lock:
            return list(self._entries)
