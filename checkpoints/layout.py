"""Where everything lives under a store root.

``blobs/ab/<sha256>.safetensors`` one tensor each, ``files/ab/<sha256>`` raw files (configs,
tokenizer files, artifacts), ``versions/<id>.json`` manifests, ``aliases.json``,
``locks/store.lock`` and ``tmp/`` for writes in progress (same filesystem, so a rename is atomic).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TENSOR_BLOB_SUFFIX = ".safetensors"


def default_root() -> Path:
    """``$MODELSURGERY_HOME/store``, else ``~/.modelsurgery/store``."""
    home = os.environ.get("MODELSURGERY_HOME")
    return (Path(home) if home else Path.home() / ".modelsurgery") / "store"


@dataclass(frozen=True)
class StoreLayout:
    root: Path

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def files(self) -> Path:
        return self.root / "files"

    @property
    def versions(self) -> Path:
        return self.root / "versions"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    @property
    def lock_file(self) -> Path:
        return self.locks / "store.lock"

    @property
    def aliases_file(self) -> Path:
        return self.root / "aliases.json"

    def tensor_blob(self, sha256: str) -> Path:
        return self.blobs / sha256[:2] / f"{sha256}{TENSOR_BLOB_SUFFIX}"

    def file_blob(self, sha256: str) -> Path:
        return self.files / sha256[:2] / sha256

    def manifest(self, version_id: str) -> Path:
        return self.versions / f"{version_id}.json"

    def create(self) -> None:
        for folder in (self.blobs, self.files, self.versions, self.tmp, self.locks):
            folder.mkdir(parents=True, exist_ok=True)
