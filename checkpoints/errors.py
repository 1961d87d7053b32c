"""Errors the store raises; lookups fail with KeyError subclasses so ``except KeyError`` works."""

from __future__ import annotations


class VersionNotFoundError(KeyError):
    """No version, alias or unique id prefix matches the reference."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "version not found"


class AliasConflictError(RuntimeError):
    """A compare-and-swap on an alias found another target than the expected one."""


class InvalidAliasError(ValueError):
    """An alias name outside ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``."""
