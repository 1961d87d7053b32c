"""The two places version commands can act on: the local store, or a server over gRPC.

Both return the same plain data, so each CLI command is written once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from modelsurgery.client.sdk import Client


class VersionBackend(Protocol):
    def list_versions(self) -> list[dict[str, Any]]: ...
    def show(self, ref: str) -> dict[str, Any]: ...
    def diff(self, a: str, b: str) -> list[dict[str, Any]]: ...
    def export(self, ref: str, folder: Path, progress: Callable[[int, int], None]) -> Path: ...
    def revert(self, ref: str) -> dict[str, Any]: ...
    def set_alias(self, name: str, version: str, expected: Any) -> str: ...
    def get_alias(self, name: str) -> str | None: ...
    def list_aliases(self) -> list[dict[str, str]]: ...
    def delete_alias(self, name: str, expected: Any) -> str | None: ...
    def import_model(
        self, reference: str, alias: str | None, progress: Callable[[int, int], None]
    ) -> dict[str, Any]: ...
    def generate(self, ref: str, prompts: list[str], options: dict[str, Any]) -> list[str]: ...
    def artifact(self, ref: str, name: str) -> bytes: ...


def _summary(
    version_id: str, parent: str | None, reference: str, methods: list[str], metrics: dict
) -> dict[str, Any]:
    return {
        "id": version_id,
        "parent": parent,
        "root_reference": reference,
        "methods": methods,
        "metrics": metrics,
    }


class LocalBackend:
    def __init__(self, store: Any) -> None:
        self.store = store

    def _summary(self, manifest: Any) -> dict[str, Any]:
        methods = [str(op.get("method")) for op in manifest.operations]
        return {
            **_summary(
                manifest.id, manifest.parent, manifest.root.reference, methods, manifest.metrics
            ),
            "created": manifest.created,
        }

    def list_versions(self) -> list[dict[str, Any]]:
        return [self._summary(m) for m in self.store.list_versions()]

    def show(self, ref: str) -> dict[str, Any]:
        manifest = self.store.get(ref)
        aliases = [n for n, v in self.store.list_aliases().items() if v == manifest.id]
        return {
            **self._summary(manifest),
            "lineage": [m.id for m in self.store.lineage(manifest.id)],
            "aliases": sorted(aliases),
            "manifest": manifest.model_dump(mode="json"),
        }

    def diff(self, a: str, b: str) -> list[dict[str, Any]]:
        return [
            {"name": c.name, "status": c.status, "relative_norm": c.relative_norm}
            for c in self.store.diff(a, b)
        ]

    def export(self, ref: str, folder: Path, progress: Callable[[int, int], None]) -> Path:
        return self.store.export(ref, folder, progress=progress)

    def revert(self, ref: str) -> dict[str, Any]:
        return self._summary(self.store.revert(ref))

    def set_alias(self, name: str, version: str, expected: Any) -> str:
        self.store.set_alias(name, version, expected=expected)
        return self.store.resolve(version)

    def get_alias(self, name: str) -> str | None:
        return self.store.get_alias(name)

    def list_aliases(self) -> list[dict[str, str]]:
        owners = self.store.alias_owners()
        return [
            {"name": name, "version_id": target, "owner": owners.get(name, "")}
            for name, target in sorted(self.store.list_aliases().items())
        ]

    def delete_alias(self, name: str, expected: Any) -> str | None:
        return self.store.delete_alias(name, expected=expected)

    def import_model(
        self, reference: str, alias: str | None, progress: Callable[[int, int], None]
    ) -> dict[str, Any]:
        from modelsurgery.models import load

        loaded = load(reference)
        manifest = self.store.import_model(
            loaded.model,
            loaded.tokenizer,
            reference=reference,
            revision=loaded.revision,
            progress=progress,
        )
        if alias:
            self.store.set_alias(alias, manifest.id)
        return self._summary(manifest)

    def generate(self, ref: str, prompts: list[str], options: dict[str, Any]) -> list[str]:
        from modelsurgery.models import load
        from modelsurgery.server.generation import generate_text

        loaded = load(self.store.resolve(ref), store=self.store)
        return generate_text(loaded.model, loaded.tokenizer, prompts, **options)

    def artifact(self, ref: str, name: str) -> bytes:
        try:
            return self.store.read_file(ref, name)
        except KeyError:
            raise FileNotFoundError(f"version {ref} has no artifact {name!r}") from None


class RemoteBackend:
    def __init__(self, client: Client) -> None:
        self.client = client

    @staticmethod
    def _summary(version: Any) -> dict[str, Any]:
        return {
            **_summary(
                version.id,
                version.parent_id or None,
                version.root_reference,
                list(version.methods),
                dict(version.metrics),
            ),
            "created": version.created.ToJsonString(),
        }

    def list_versions(self) -> list[dict[str, Any]]:
        return [self._summary(v) for v in self.client.list_versions()]

    def show(self, ref: str) -> dict[str, Any]:
        response = self.client.get_version(ref)
        return {
            **self._summary(response.version),
            "lineage": list(response.lineage),
            "aliases": list(response.aliases),
            "manifest": json.loads(response.version.manifest_json),
        }

    def diff(self, a: str, b: str) -> list[dict[str, Any]]:
        return [
            {
                "name": c.name,
                "status": c.status,
                "relative_norm": c.relative_norm if c.has_relative_norm else None,
            }
            for c in self.client.diff(a, b)
        ]

    def export(self, ref: str, folder: Path, progress: Callable[[int, int], None]) -> Path:
        received = 0

        def advance(n: int) -> None:
            nonlocal received
            received += n
            progress(received, 0)

        return self.client.download(ref, folder, progress=advance)

    def revert(self, ref: str) -> dict[str, Any]:
        return self._summary(self.client.revert(ref))

    def set_alias(self, name: str, version: str, expected: Any) -> str:
        return self.client.set_alias(name, version, expected=expected)

    def get_alias(self, name: str) -> str | None:
        return self.client.get_alias(name)

    def list_aliases(self) -> list[dict[str, str]]:
        return [
            {"name": a.name, "version_id": a.version_id, "owner": a.owner}
            for a in self.client.list_aliases()
        ]

    def delete_alias(self, name: str, expected: Any) -> str | None:
        return self.client.delete_alias(name, expected=expected)

    def import_model(
        self, reference: str, alias: str | None, progress: Callable[[int, int], None]
    ) -> dict[str, Any]:
        return self._summary(self.client.import_model(reference, alias=alias))

    def generate(self, ref: str, prompts: list[str], options: dict[str, Any]) -> list[str]:
        return self.client.generate(ref, prompts, **options)

    def artifact(self, ref: str, name: str) -> bytes:
        return self.client.get_artifact(ref, name)
