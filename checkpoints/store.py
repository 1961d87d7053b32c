"""The versioned checkpoint store.

Write order makes crashes harmless: blobs first (each temp file + fsync + rename + folder
fsync), the manifest last (same). A version exists once its manifest exists, and by then every
blob it names is durable, so a killed writer leaves the old state or the new one. What it can
leave behind is a temp file in ``tmp/`` (readers never look there; :meth:`gc`, also run on
open, deletes those whose writer is dead) and unreferenced blobs (harmless, re-used if the
same tensor is written again).

Manifests and aliases change only under one store-level file lock; blobs need none, since
concurrent writes of one address carry the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from modelsurgery.checkpoints.aliases import ALIAS_RE, AliasTable, Authorize, Expected
from modelsurgery.checkpoints.atomic import atomic_write, remove_orphans
from modelsurgery.checkpoints.blobs import BlobStore
from modelsurgery.checkpoints.diff import TensorChange, diff_entries
from modelsurgery.checkpoints.errors import VersionNotFoundError
from modelsurgery.checkpoints.export import (
    DEFAULT_MAX_SHARD_SIZE,
    RESERVED_NAMES,
    Progress,
    safe_relative_path,
    write_adapter_folder,
    write_folder,
)
from modelsurgery.checkpoints.hf import CONFIG_FILE, json_file_bytes, model_files, tokenizer_files
from modelsurgery.checkpoints.layout import StoreLayout, default_root
from modelsurgery.checkpoints.manifest import (
    VERSION_ID_RE,
    Manifest,
    RootRef,
    TensorEntry,
    content_id,
    normalize_json,
)
from modelsurgery.checkpoints.model_card import (
    HOOKS_KEY,
    render_adapter_card,
    render_model_card,
    warn_if_hooked,
)
from modelsurgery.checkpoints.resolved import ResolvedVersion, resolve_lineage
from modelsurgery.checkpoints.verify import VerifyReport, verify_store
from modelsurgery.models.digest import digest_from_hashes, persistent_state_dict

MIN_PREFIX_LEN = 5
# What a peft adapter folder holds its settings in (``adapter_files``).
ADAPTER_CONFIG_FILE = "adapter_config.json"
ORPHAN_MAX_AGE_S = 24 * 3600.0
_LIBRARIES = ("modelsurgery", "torch", "transformers", "safetensors")


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


def _now() -> str:
    return datetime.now(UTC).isoformat()


class CheckpointStore:
    """Immutable versions (manifests over content-addressed blobs), lineage and aliases."""

    def __init__(self, root: Path | str | None = None, *, lock_timeout: float = 300.0) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.layout = StoreLayout(self.root)
        self.layout.create()
        self._lock = FileLock(str(self.layout.lock_file), timeout=lock_timeout)
        self._blobs = BlobStore(self.layout)
        self._aliases = AliasTable(self.layout, self._lock)
        self._manifests: dict[str, Manifest] = {}
        self._resolved: dict[str, ResolvedVersion] = {}
        self.gc()

    # --- writing ---------------------------------------------------------------------------
    def import_model(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        reference: str,
        revision: str | None = None,
        progress: Progress | None = None,
    ) -> Manifest:
        """Store a base version (no parent); the same model imported again is the same version.
        ``revision``: the Hub commit the reference resolved to, recorded in the root."""
        tensors = persistent_state_dict(model)
        entries = {}
        for done, (name, tensor) in enumerate(tensors.items(), start=1):
            entries[name] = self._blobs.put_tensor(tensor)
            if progress is not None:
                progress(done, len(tensors))
        files = tokenizer_files(tokenizer) if tokenizer is not None else {}
        files.update(model_files(model))
        hashes = {name: self._blobs.put_file(data) for name, data in sorted(files.items())}
        digest = digest_from_hashes({name: e.tensor_digest for name, e in entries.items()})
        return self._publish(
            parent=None,
            root=RootRef(reference=reference, digest=digest, revision=revision),
            tensors=entries,
            files=hashes,
            operations=[],
        )

    def commit(
        self,
        parent: str,
        changed: dict[str, torch.Tensor],
        *,
        operations: list[dict],
        metrics: dict[str, float] | None = None,
        config_overrides: dict | None = None,
        artifacts: dict[str, bytes] | None = None,
        removed: list[str] | None = None,
        job_id: str | None = None,
        failed_gates: list[dict[str, Any]] | None = None,
    ) -> Manifest:
        """A child of ``parent`` holding only the tensors and artifacts that differ from it;
        ``job_id`` names the job publishing it (see ``version_of_job``); ``failed_gates``
        marks a candidate kept although its job's gates failed (``keep_failed``)."""
        base = self._resolve_version(self.resolve(parent))
        artifacts = artifacts or {}
        removed = sorted(set(removed or []))
        self._check_commit(base, changed, artifacts, removed)
        entries = {}
        for name, tensor in sorted(changed.items()):
            entry = self._blobs.put_tensor(tensor)
            if base.tensors.get(name) != entry:
                entries[name] = entry
        hashes = {}
        for name, data in sorted(artifacts.items()):
            sha = self._blobs.put_file(data)
            if base.artifacts.get(name) != sha:
                hashes[name] = sha
        return self._publish(
            parent=base.manifest.id,
            root=base.manifest.root,
            tensors=entries,
            removed=removed,
            artifacts=hashes,
            config_overrides=normalize_json(config_overrides or {}, "config_overrides"),
            operations=normalize_json(operations, "operations"),
            metrics={name: float(value) for name, value in (metrics or {}).items()},
            job_id=job_id,
            failed_gates=normalize_json(failed_gates or [], "failed_gates"),
        )

    @staticmethod
    def _check_commit(
        base: ResolvedVersion,
        changed: dict[str, torch.Tensor],
        artifacts: dict[str, bytes],
        removed: list[str],
    ) -> None:
        for name in removed:
            if name in changed or name in artifacts:
                raise ValueError(f"{name!r} is both removed and written")
            if name not in base.tensors and name not in base.artifacts:
                raise ValueError(f"cannot remove {name!r}: no such tensor or artifact")
        for name in artifacts:
            safe_relative_path(name)
            if name in RESERVED_NAMES or name in base.files:
                raise ValueError(f"artifact name {name!r} is reserved")
            if name in changed or name in base.tensors:
                raise ValueError(f"artifact name {name!r} is a tensor name")

    def revert(self, ref: str) -> Manifest:
        """A new child of ``ref`` whose tensors, artifacts and config equal ``ref``'s parent's.

        Config keys that the parent lacks are set to None (overrides cannot delete keys)."""
        target = self._resolve_version(self.resolve(ref))
        if target.manifest.parent is None:
            raise ValueError(f"cannot revert {target.manifest.id}: a base version has no parent")
        restore = self._resolve_version(target.manifest.parent)
        now, then = self._config(target), self._config(restore)
        return self._publish(
            parent=target.manifest.id,
            root=target.manifest.root,
            tensors={n: e for n, e in restore.tensors.items() if target.tensors.get(n) != e},
            removed=sorted(
                (target.tensors.keys() - restore.tensors.keys())
                | (target.artifacts.keys() - restore.artifacts.keys())
            ),
            artifacts={n: s for n, s in restore.artifacts.items() if target.artifacts.get(n) != s},
            config_overrides={
                key: then.get(key)
                for key in sorted(now.keys() | then.keys())
                if now.get(key) != then.get(key)
            },
            operations=[
                {
                    "method": "revert",
                    "reverted": target.manifest.id,
                    "restored": restore.manifest.id,
                }
            ],
        )

    def _publish(
        self,
        *,
        parent: str | None,
        root: RootRef,
        tensors: dict[str, TensorEntry],
        operations: list[dict[str, Any]],
        removed: list[str] | None = None,
        files: dict[str, str] | None = None,
        artifacts: dict[str, str] | None = None,
        config_overrides: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        job_id: str | None = None,
        failed_gates: list[dict[str, Any]] | None = None,
    ) -> Manifest:
        """Write the manifest (blobs are already durable); an identical version is returned."""
        content: dict[str, Any] = {
            "parent": parent,
            "tensors": tensors,
            "removed": sorted(removed or []),
            "files": files or {},
            "artifacts": artifacts or {},
            "config_overrides": config_overrides or {},
            "operations": operations,
        }
        if failed_gates:
            content["failed_gates"] = failed_gates
        version_id = content_id(**content)
        path = self.layout.manifest(version_id)
        with self._lock:
            if path.is_file():
                return self._manifest(version_id)
            if parent is not None and not self.layout.manifest(parent).is_file():
                raise VersionNotFoundError(f"parent version {parent} not found")
            manifest = Manifest(
                id=version_id,
                root=root,
                metrics=metrics or {},
                library_versions=_library_versions(),
                created=_now(),
                job_id=job_id,
                **content,
            )
            atomic_write(path, manifest.to_json_bytes(), self.layout.tmp)
        self._manifests[version_id] = manifest
        return manifest

    # --- reading ---------------------------------------------------------------------------
    def _version_ids(self) -> list[str]:
        ids = (path.stem for path in self.layout.versions.glob("v*.json"))
        return sorted(i for i in ids if VERSION_ID_RE.fullmatch(i))

    def _manifest(self, version_id: str) -> Manifest:
        manifest = self._manifests.get(version_id)
        if manifest is None:
            try:
                data = self.layout.manifest(version_id).read_bytes()
            except FileNotFoundError:
                raise VersionNotFoundError(f"version {version_id} not found") from None
            manifest = self._manifests[version_id] = Manifest.from_json_bytes(data)
        return manifest

    def resolve(self, ref: str) -> str:
        """Version id for a version id, an alias, a built-in model reference already imported
        (``smollm2-135m``: its root), or a unique id prefix (at least 5 chars)."""
        from modelsurgery.models.aliases import BUILTIN_ALIASES

        if VERSION_ID_RE.fullmatch(ref) and self.layout.manifest(ref).is_file():
            return ref
        if ALIAS_RE.fullmatch(ref):
            target = self._aliases.get(ref)
            if target is not None:
                return target
        if ref in BUILTIN_ALIASES:
            root = self.imported_root(ref)
            if root is not None:
                return root.id
        if len(ref) >= MIN_PREFIX_LEN:
            matches = [i for i in self._version_ids() if i.startswith(ref)]
            if len(matches) == 1:
                return matches[0]
            if matches:
                raise VersionNotFoundError(f"{ref!r} is ambiguous: {', '.join(matches)}")
        raise VersionNotFoundError(f"no version, alias or unique id prefix {ref!r}")

    def imported_root(self, reference: str) -> Manifest | None:
        """The newest root version imported from model reference ``reference`` (a built-in
        alias such as ``smollm2-135m``), None when it was never imported."""
        return next(
            (
                m
                for m in self.list_versions()
                if m.parent is None and not m.operations and m.root.reference == reference
            ),
            None,
        )

    def get(self, ref: str) -> Manifest:
        return self._manifest(self.resolve(ref))

    def version_of_job(self, job_id: str) -> Manifest | None:
        """The version job ``job_id`` published, if any (a scan: used when recovering)."""
        return next((m for m in self.list_versions() if m.job_id == job_id), None)

    def list_versions(self) -> list[Manifest]:
        """Every version, newest first."""
        manifests = [self._manifest(i) for i in self._version_ids()]
        return sorted(manifests, key=lambda m: (m.created, m.id), reverse=True)

    def lineage(self, ref: str) -> list[Manifest]:
        """``[self, parent, ..., root]``."""
        chain = [self.get(ref)]
        while chain[-1].parent is not None:
            chain.append(self._manifest(chain[-1].parent))
        return chain

    def _resolve_version(self, version_id: str) -> ResolvedVersion:
        resolved = self._resolved.get(version_id)
        if resolved is None:
            resolved = self._resolved[version_id] = resolve_lineage(self.lineage(version_id))
        return resolved

    def tensor_entries(self, ref: str) -> dict[str, TensorEntry]:
        """The resolved tensor map (name -> blob entry) without reading any tensor."""
        return dict(self._resolve_version(self.resolve(ref)).tensors)

    def state_dict(self, ref: str) -> dict[str, torch.Tensor]:
        entries = self._resolve_version(self.resolve(ref)).tensors
        return {name: self._blobs.tensor(entry) for name, entry in entries.items()}

    def tensor(self, ref: str, name: str) -> torch.Tensor:
        entry = self._resolve_version(self.resolve(ref)).tensors.get(name)
        if entry is None:
            raise KeyError(f"version {ref!r} has no tensor {name!r}")
        return self._blobs.tensor(entry)

    def read_file(self, ref: str, name: str) -> bytes:
        resolved = self._resolve_version(self.resolve(ref))
        sha = resolved.files.get(name) or resolved.artifacts.get(name)
        if sha is None:
            raise KeyError(f"version {ref!r} has no file {name!r}")
        return self._blobs.file(sha)

    def _config(self, resolved: ResolvedVersion) -> dict[str, Any]:
        config = json.loads(self._blobs.file(resolved.files[CONFIG_FILE]))
        for overrides in resolved.config_overrides:
            config.update(overrides)
        return config

    def hf_config(self, ref: str) -> dict[str, Any]:
        """config.json with every override along the lineage applied, root first."""
        return self._config(self._resolve_version(self.resolve(ref)))

    def digest(self, ref: str) -> str:
        """Equals ``models.digest.model_digest`` of the loaded version (dense blobs)."""
        entries = self._resolve_version(self.resolve(ref)).tensors
        return digest_from_hashes({name: e.tensor_digest for name, e in entries.items()})

    def diff(self, a: str, b: str) -> list[TensorChange]:
        left = self._resolve_version(self.resolve(a)).tensors
        right = self._resolve_version(self.resolve(b)).tensors
        return diff_entries(left, right, self._blobs.tensor)

    def export(
        self,
        ref: str,
        folder: Path | str,
        progress: Progress | None = None,
        *,
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
        shown: Callable[[Manifest], Manifest] | None = None,
        leave_out: Collection[str] = (),
    ) -> Path:
        """A folder ``from_pretrained`` loads as is, with a model card (README.md);
        ``progress(done, total)`` counts tensors. A version whose edit lives in hooks warns
        (HookedExportWarning): plain ``from_pretrained`` loads it as the unedited base.
        ``shown`` maps each manifest of the lineage to what ``modelsurgery.json`` and the card
        say of it, and ``leave_out`` names stored files not written: the server's redaction of
        training data for callers who may not see it (the store keeps everything whole)."""
        from modelsurgery.editing.attachments import adapter_folder, loading_notes

        show = shown or (lambda manifest: manifest)
        resolved = self._resolve_version(self.resolve(ref))
        stored = {**resolved.files, **resolved.artifacts}
        hooks = loading_notes(resolved.artifacts)
        digest = self.digest(resolved.manifest.id)
        record = {
            "manifest": show(resolved.manifest).model_dump(mode="json"),
            "lineage": list(resolved.lineage),
            "digest": digest,
            HOOKS_KEY: list(hooks),
        }
        lineage = [show(self._manifest(version_id)) for version_id in resolved.lineage]
        adapter = adapter_folder(resolved.artifacts)
        if adapter is not None and digest == lineage[-1].root.digest:
            # The adapter was trained on the root's own weights: the export is the adapter
            # folder alone, loaded onto the base as its library does (peft).
            base_model = _hub_id(lineage[-1]) or lineage[-1].root.reference
            files = {
                name: self._blobs.file(sha)
                for name, sha in stored.items()
                if name not in leave_out and name != CONFIG_FILE
            }
            return write_adapter_folder(
                Path(folder),
                files=adapter_files(files, adapter, base_model),
                lineage_record={**record, HOOKS_KEY: [], "adapter": adapter},
                model_card=render_adapter_card(lineage, digest, base_model),
            )
        written = write_folder(
            Path(folder),
            config=self._config(resolved),
            files={
                name: self._blobs.file(sha) for name, sha in stored.items() if name not in leave_out
            },
            entries=resolved.tensors,
            load=self._blobs.tensor,
            lineage_record=record,
            model_card=render_model_card(lineage, digest, hooks, _hub_id(lineage[-1])),
            max_shard_size=max_shard_size,
            progress=progress,
        )
        warn_if_hooked(written)
        return written

    # --- aliases ---------------------------------------------------------------------------
    def set_alias(
        self,
        name: str,
        version_id: str,
        *,
        expected: Expected = ...,
        owner: str = "",
        authorize: Authorize | None = None,
    ) -> None:
        """Point ``name`` at a version; with ``expected`` (None: must not exist) this is a
        compare-and-swap that raises AliasConflictError when the current target differs.
        A new alias records ``owner``; moving an existing one first asks ``authorize`` (with
        its owner, ``""`` if unknown), under the store lock."""
        self._aliases.set(
            name, self.resolve(version_id), expected, owner=owner, authorize=authorize
        )

    def get_alias(self, name: str) -> str | None:
        return self._aliases.get(name)

    def alias_owner(self, name: str) -> str | None:
        """Who created alias ``name`` (``""`` if unknown); None when it does not exist."""
        return self._aliases.owner(name)

    def list_aliases(self) -> dict[str, str]:
        return self._aliases.read()

    def alias_owners(self) -> dict[str, str]:
        """Each alias's owner (``""`` if unknown)."""
        return self._aliases.owners()

    def delete_alias(
        self, name: str, *, expected: Expected = ..., authorize: Authorize | None = None
    ) -> str | None:
        """Remove alias ``name`` (asking ``authorize`` with its owner, under the store lock);
        the version it pointed to, None when it did not exist."""
        return self._aliases.delete(name, expected, authorize=authorize)

    # --- maintenance -----------------------------------------------------------------------
    def verify(self) -> VerifyReport:
        """Re-hash every blob; check every manifest's id, parent and blobs, every alias."""
        return verify_store(self.layout, self._blobs, self._aliases.read())

    def gc(self, *, max_age_s: float = ORPHAN_MAX_AGE_S) -> list[Path]:
        """Delete temp files of dead writers (same host) or older than ``max_age_s``."""
        return remove_orphans(self.layout.tmp, max_age_s)


def adapter_files(files: dict[str, bytes], adapter: str, base_model: str) -> dict[str, bytes]:
    """The export's files with the adapter folder's at the top; its config names
    ``base_model`` (peft records the path the model was trained from, a server's temp)."""
    prefix = f"{adapter}/"
    out = {name: data for name, data in files.items() if not name.startswith(prefix)}
    for name, data in files.items():
        if name.startswith(prefix):
            out[name[len(prefix) :]] = data
    config = ADAPTER_CONFIG_FILE
    if config in out:
        out[config] = json_file_bytes(
            {**json.loads(out[config]), "base_model_name_or_path": base_model}
        )
    return out


def _hub_id(root: Manifest) -> str | None:
    """The Hugging Face repository of a root imported from the Hub or a built-in alias."""
    from modelsurgery.models.aliases import BUILTIN_ALIASES
    from modelsurgery.models.references import HUB_REFERENCE

    alias = BUILTIN_ALIASES.get(root.root.reference)
    if alias is not None:
        return alias.hub_id
    hub = HUB_REFERENCE.match(root.root.reference) if root.root.revision else None
    return hub.group("repo") if hub is not None else None
