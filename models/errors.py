"""Errors raised while resolving or loading a model reference."""

from __future__ import annotations


class ModelReferenceError(ValueError):
    """A model reference that cannot be resolved; the message names it and what is accepted."""


class ReferenceNotAllowedError(ModelReferenceError):
    """A path reference outside the allowed roots (after resolving symlinks and ``..``)."""


class ModelPackageMissingError(ModelReferenceError):
    """A built-in alias whose model package is not installed; the message says how to install."""
