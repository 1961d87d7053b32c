"""Versioned checkpoint store: immutable versions over content-addressed blobs, with lineage,
aliases (compare-and-swap), diff, revert, verify and export to a from_pretrained folder with a
model card."""

from modelsurgery.checkpoints.diff import TensorChange
from modelsurgery.checkpoints.errors import (
    AliasConflictError,
    InvalidAliasError,
    VersionNotFoundError,
)
from modelsurgery.checkpoints.layout import default_root
from modelsurgery.checkpoints.manifest import Manifest, RootRef, TensorEntry
from modelsurgery.checkpoints.model_card import HookedExportWarning
from modelsurgery.checkpoints.store import CheckpointStore
from modelsurgery.checkpoints.verify import VerifyReport

__all__ = [
    "AliasConflictError",
    "CheckpointStore",
    "HookedExportWarning",
    "InvalidAliasError",
    "Manifest",
    "RootRef",
    "TensorChange",
    "TensorEntry",
    "VerifyReport",
    "VersionNotFoundError",
    "default_root",
]
