"""Classify a model reference without loading weights, so a server can validate a job spec.

Precedence: anything path-shaped (absolute, ``~``, ``.``, a separator, or a ``.gguf`` name) is a
path, except ``org/name`` and ``org/name@revision`` that exist as no path: those are Hugging Face
Hub repositories, resolved through the local Hub cache (``HF_HOME``; nothing is fetched when
``HF_HUB_OFFLINE=1``). Otherwise a built-in alias, then a stored version id / alias (when a
store is given), then a bare relative path that exists.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from modelsurgery.models.aliases import BUILTIN_ALIASES
from modelsurgery.models.errors import (
    ModelPackageMissingError,
    ModelReferenceError,
    ReferenceNotAllowedError,
)

GGUF_MAGIC = b"GGUF"
HUB_REFERENCE = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<revision>[\w./-]+))?$"
)
# What a causal LM's folder needs; a repository's other files (ONNX, GGUF, pickles) stay remote.
HUB_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja")


class SourceKind(StrEnum):
    FOLDER = "folder"
    GGUF = "gguf"
    ALIAS = "alias"
    STORE = "store"
    HUB = "hub"


@dataclass(frozen=True)
class ResolvedReference:
    """What a reference names. ``path`` is the folder or GGUF file (for ``gemma3-270m`` the
    cache path it is assembled into on first load; for a Hub repository its snapshot folder);
    ``version_id`` is set for stored versions; ``revision`` is the commit a Hub reference
    resolved to."""

    reference: str
    kind: SourceKind
    path: Path | None = None
    version_id: str | None = None
    alias: str | None = None
    revision: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.kind in (SourceKind.GGUF, SourceKind.ALIAS)


class VersionResolver(Protocol):
    def resolve(self, ref: str) -> str: ...


def accepted_kinds() -> str:
    aliases = ", ".join(sorted(BUILTIN_ALIASES))
    return (
        "a local Hugging Face model folder (with config.json), a .gguf file, a Hugging Face Hub "
        f"repository (org/name or org/name@revision), a built-in alias ({aliases}), or a stored "
        "version id or alias (with a checkpoint store)"
    )


def unresolvable(reference: str, reason: str) -> ModelReferenceError:
    return ModelReferenceError(
        f"cannot resolve model reference {reference!r}: {reason}. Accepted: {accepted_kinds()}"
    )


def resolve_reference(
    reference: str | os.PathLike[str],
    allowed_roots: Sequence[str | os.PathLike[str]] | None = None,
    *,
    store: VersionResolver | None = None,
) -> ResolvedReference:
    """Classify ``reference`` (cheap: no weights, no package imports).

    ``allowed_roots`` restricts path references to those folders: the path as written (``..``
    folded) is checked before the file system is touched, then again with symlinks resolved,
    and a path outside gets one message whatever exists there. Built-in aliases, Hub
    repositories and stored versions are not paths and always allowed.
    """
    if isinstance(reference, os.PathLike):
        return _resolve_path(os.fspath(reference), allowed_roots)
    if not isinstance(reference, str) or not reference.strip():
        raise unresolvable(str(reference), "empty reference")
    hub = HUB_REFERENCE.match(reference)
    if hub is not None and not _exists(reference, allowed_roots):
        return _resolve_hub(reference, hub.group("repo"), hub.group("revision"))
    if _looks_like_path(reference):
        return _resolve_path(reference, allowed_roots)
    builtin = BUILTIN_ALIASES.get(reference)
    if builtin is not None:
        try:
            builtin.check_installed()
        except ModelPackageMissingError:
            stored = _resolve_stored(reference, store)
            if stored is None:
                raise
            return stored
        return ResolvedReference(reference, SourceKind.ALIAS, builtin.locate(), alias=reference)
    if store is not None:
        try:
            version_id = store.resolve(reference)
        except (KeyError, ValueError) as exc:
            if _exists(reference, allowed_roots):
                return _resolve_path(reference, allowed_roots)
            raise unresolvable(
                reference, f"not a path, built-in alias or stored version ({exc})"
            ) from exc
        return ResolvedReference(reference, SourceKind.STORE, version_id=version_id)
    if _exists(reference, allowed_roots):
        return _resolve_path(reference, allowed_roots)
    raise unresolvable(
        reference, "not an existing path or built-in alias, and no checkpoint store was given"
    )


def _resolve_stored(reference: str, store: VersionResolver | None) -> ResolvedReference | None:
    """A store alias that shares a built-in alias's name, used when its package is missing."""
    if store is None:
        return None
    try:
        version_id = store.resolve(reference)
    except (KeyError, ValueError):
        return None
    return ResolvedReference(reference, SourceKind.STORE, version_id=version_id)


def _resolve_hub(reference: str, repo_id: str, revision: str | None) -> ResolvedReference:
    """A Hub repository's snapshot in the local cache (downloaded into it unless offline); the
    snapshot folder's name is the commit the revision resolved to."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError as exc:
        raise unresolvable(
            reference,
            "not in the local Hugging Face cache (HF_HOME) and the Hub cannot be reached "
            f"or HF_HUB_OFFLINE is set ({exc.__class__.__name__})",
        ) from None
    except (HfHubHTTPError, ValueError, OSError) as exc:
        raise unresolvable(reference, f"the Hugging Face Hub refused it: {exc}") from None
    if not (folder / "config.json").is_file():
        raise unresolvable(reference, f"Hub repository {repo_id} has no config.json")
    return ResolvedReference(reference, SourceKind.HUB, folder, revision=folder.name)


def _looks_like_path(reference: str) -> bool:
    separators = tuple(s for s in (os.sep, os.altsep) if s)
    return (
        reference.startswith(("/", "~", "."))
        or any(s in reference for s in separators)
        or reference.lower().endswith(".gguf")
    )


class _NoSuchUser(Exception):
    """``~name`` for a name with no home on this machine."""


def _expanded(reference: str) -> Path:
    try:
        return Path(reference).expanduser()
    except RuntimeError as exc:  # pathlib's answer to an unknown ``~name``
        raise _NoSuchUser from exc


def _roots(allowed_roots: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Each root as written (absolute) and with its own symlinks resolved."""
    roots: list[Path] = []
    for root in allowed_roots:
        given = Path(os.path.abspath(Path(root).expanduser()))
        roots.extend(dict.fromkeys((given, given.resolve())))
    return roots


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def _lexical(reference: str) -> Path:
    """The absolute path as written, ``..`` folded, without touching the file system."""
    return Path(os.path.abspath(_expanded(reference)))


def _exists(reference: str, allowed_roots: Sequence[str | os.PathLike[str]] | None) -> bool:
    """Whether ``reference`` names an existing path; with roots, only paths under them are
    looked at, so the answer says nothing about the rest of the file system."""
    try:
        if allowed_roots is not None and not _inside(_lexical(reference), _roots(allowed_roots)):
            return False
        return _expanded(reference).exists()
    except _NoSuchUser:
        return False


def _link_out(folder: Path, roots: list[Path]) -> str | None:
    """The first entry of ``folder``, at any depth, that resolves outside ``roots`` (its path
    in the folder), or None. Loaders read subfolders too (a tokenizer's, an adapter's); a
    folder linked to from inside is walked once, so a link cycle ends."""
    seen = {folder}
    for current, dirs, files in os.walk(folder, followlinks=True):
        here = Path(current)
        for name in (*dirs, *files):
            if not _inside((here / name).resolve(), roots):
                return (here / name).relative_to(folder).as_posix()
        unseen = []
        for name in dirs:
            real = (here / name).resolve()
            if real not in seen:
                seen.add(real)
                unseen.append(name)
        dirs[:] = unseen
    return None


def outside_roots(reference: str, detail: str = "") -> ReferenceNotAllowedError:
    return ReferenceNotAllowedError(
        f"model reference {reference!r} is outside the server's model roots{detail}"
    )


def _resolve_path(
    reference: str, allowed_roots: Sequence[str | os.PathLike[str]] | None
) -> ResolvedReference:
    roots = None if allowed_roots is None else _roots(allowed_roots)
    try:
        if roots is not None and not _inside(_lexical(reference), roots):
            raise outside_roots(reference)
        path = _expanded(reference).resolve()
    except _NoSuchUser:
        # Under roots, an unknown user reads like a known one's home: outside them.
        if roots is not None:
            raise outside_roots(reference) from None
        raise unresolvable(reference, "its ~name names no user on this machine") from None
    if roots is not None and not _inside(path, roots):
        raise outside_roots(reference, " (it is a link that leads out of them)")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise unresolvable(reference, "the folder has no config.json")
        leak = None if roots is None else _link_out(path, roots)
        if leak is not None:
            raise outside_roots(reference, f" (its {leak} links out of them)")
        return ResolvedReference(reference, SourceKind.FOLDER, path)
    if path.is_file():
        with path.open("rb") as f:
            if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise unresolvable(reference, "it is a file but not a GGUF file")
        return ResolvedReference(reference, SourceKind.GGUF, path)
    raise unresolvable(reference, "no such file or folder")
