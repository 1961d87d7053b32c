"""A version seen whole: its own entries laid over its ancestors', root first."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modelsurgery.checkpoints.manifest import Manifest, TensorEntry


@dataclass(frozen=True)
class ResolvedVersion:
    manifest: Manifest
    lineage: tuple[str, ...]
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    config_overrides: tuple[dict[str, Any], ...] = ()


def resolve_lineage(lineage: list[Manifest]) -> ResolvedVersion:
    """``lineage`` is [self, parent, ..., root], as :meth:`CheckpointStore.lineage` returns."""
    tensors: dict[str, TensorEntry] = {}
    files: dict[str, str] = {}
    artifacts: dict[str, str] = {}
    for manifest in reversed(lineage):
        for name in manifest.removed:
            tensors.pop(name, None)
            artifacts.pop(name, None)
        tensors.update(manifest.tensors)
        files.update(manifest.files)
        artifacts.update(manifest.artifacts)
    return ResolvedVersion(
        manifest=lineage[0],
        lineage=tuple(m.id for m in lineage),
        tensors=dict(sorted(tensors.items())),
        files=files,
        artifacts=artifacts,
        config_overrides=tuple(m.config_overrides for m in reversed(lineage)),
    )
