"""Integrity check of a whole store: every blob re-hashed, every manifest's references present."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import ValidationError

from modelsurgery.checkpoints.blobs import BlobStore, file_sha256
from modelsurgery.checkpoints.layout import StoreLayout
from modelsurgery.checkpoints.manifest import VERSION_ID_RE, Manifest
from modelsurgery.models.digest import tensor_sha256


@dataclass(frozen=True)
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    blobs_checked: int = 0
    versions_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_blobs(blobs: BlobStore, problems: list[str]) -> int:
    count = 0
    for path, claimed in blobs.all_blobs():
        count += 1
        actual = file_sha256(path)
        if actual != claimed:
            problems.append(f"corrupt blob {path.name}: content hashes to {actual}")
    return count


def _load_manifests(layout: StoreLayout, problems: list[str]) -> dict[str, Manifest]:
    manifests = {}
    for path in sorted(layout.versions.glob("*.json")):
        try:
            manifest = Manifest.from_json_bytes(path.read_bytes())
        except (ValidationError, ValueError) as e:
            problems.append(f"unreadable manifest {path.name}: {e}")
            continue
        if not VERSION_ID_RE.fullmatch(path.stem) or manifest.id != path.stem:
            problems.append(f"manifest {path.name} holds version {manifest.id}")
        elif manifest.expected_id() != manifest.id:
            problems.append(f"version {manifest.id}: content does not hash to its id")
        manifests[manifest.id] = manifest
    return manifests


def _check_references(
    manifest: Manifest, manifests: dict[str, Manifest], blobs: BlobStore, problems: list[str]
) -> None:
    if manifest.parent is not None and manifest.parent not in manifests:
        problems.append(f"version {manifest.id}: parent {manifest.parent} missing")
    for name, entry in manifest.tensors.items():
        if not blobs.has_tensor(entry.blob):
            problems.append(f"version {manifest.id}: blob of tensor {name} missing")
        elif entry.digest is not None and tensor_sha256(blobs.tensor(entry)) != entry.digest:
            problems.append(f"version {manifest.id}: tensor {name} does not decode to its digest")
    for name, sha in {**manifest.files, **manifest.artifacts}.items():
        if not blobs.has_file(sha):
            problems.append(f"version {manifest.id}: file {name} missing")


def verify_store(layout: StoreLayout, blobs: BlobStore, aliases: dict[str, str]) -> VerifyReport:
    problems: list[str] = []
    blob_count = _check_blobs(blobs, problems)
    manifests = _load_manifests(layout, problems)
    for manifest in manifests.values():
        _check_references(manifest, manifests, blobs, problems)
    for name, target in sorted(aliases.items()):
        if target not in manifests:
            problems.append(f"alias {name}: target {target} missing")
    return VerifyReport(problems, blob_count, len(manifests))
