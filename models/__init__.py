"""Base models: loading any reference kind, and architecture adapters for surgery methods."""

from modelsurgery.models.adapters import (
    FAMILIES,
    ArchitectureAdapter,
    Projection,
    UnsupportedArchitectureError,
    get_adapter,
)
from modelsurgery.models.aliases import BUILTIN_ALIASES
from modelsurgery.models.errors import (
    ModelPackageMissingError,
    ModelReferenceError,
    ReferenceNotAllowedError,
)
from modelsurgery.models.loading import LoadedModel, as_dtype, load, load_config
from modelsurgery.models.references import ResolvedReference, SourceKind, resolve_reference

__all__ = [
    "BUILTIN_ALIASES",
    "FAMILIES",
    "ArchitectureAdapter",
    "LoadedModel",
    "ModelPackageMissingError",
    "ModelReferenceError",
    "Projection",
    "ReferenceNotAllowedError",
    "ResolvedReference",
    "SourceKind",
    "UnsupportedArchitectureError",
    "as_dtype",
    "get_adapter",
    "load",
    "load_config",
    "resolve_reference",
]
