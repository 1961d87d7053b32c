"""The manifest of one immutable version, and its content-addressed id."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from modelsurgery.checkpoints.codecs import DENSE

VERSION_ID_RE = re.compile(r"v[0-9a-f]{20}")
FORMAT_VERSION = 1


class TensorEntry(BaseModel):
    """Where one tensor's bytes are and what they decode to. ``digest`` is the dense tensor's
    hash when the blob is not the dense encoding (for dense blobs it is the blob's own)."""

    model_config = ConfigDict(frozen=True)

    blob: str
    dtype: str
    shape: list[int]
    encoding: str = DENSE
    digest: str | None = None

    @property
    def tensor_digest(self) -> str:
        return self.digest or self.blob

    @property
    def nbytes(self) -> int:
        """Size of the dense tensor (not of the blob)."""
        itemsize = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        count = 1
        for dim in self.shape:
            count *= dim
        return count * itemsize


class RootRef(BaseModel):
    """The base model a lineage started from; ``revision`` is the commit a Hugging Face Hub
    reference resolved to when it was imported."""

    model_config = ConfigDict(frozen=True)

    reference: str
    digest: str
    revision: str | None = None


class Manifest(BaseModel):
    """One version. ``tensors``, ``files`` and ``artifacts`` hold only what this version wrote;
    everything else resolves through ``parent``. ``removed`` names tensors or artifacts that
    this version drops."""

    model_config = ConfigDict(frozen=True, ser_json_inf_nan="constants")

    id: str
    parent: str | None
    root: RootRef
    operations: list[dict[str, Any]]
    metrics: dict[str, float] = Field(default_factory=dict)
    library_versions: dict[str, str] = Field(default_factory=dict)
    created: str
    tensors: dict[str, TensorEntry] = Field(default_factory=dict)
    removed: list[str] = Field(default_factory=list)
    files: dict[str, str] = Field(default_factory=dict)
    artifacts: dict[str, str] = Field(default_factory=dict)
    config_overrides: dict[str, Any] = Field(default_factory=dict)
    # The job whose publish wrote this manifest: publishing is a job's commit point, so a
    # server restarted between the publish and the job's record finds its version here.
    # Not part of the id (a re-run of the same edit is the same version).
    job_id: str | None = None
    # A candidate kept for inspection (``keep_failed``): the gates its job judged it on, with
    # the ones that failed; such a version was never given an alias. Part of the id, so it is
    # never the version a passing job publishes.
    failed_gates: list[dict[str, Any]] = Field(default_factory=list)
    format_version: int = FORMAT_VERSION

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json(indent=2).encode()

    @classmethod
    def from_json_bytes(cls, data: bytes) -> Manifest:
        return cls.model_validate_json(data)

    def expected_id(self) -> str:
        return content_id(
            parent=self.parent,
            tensors=self.tensors,
            removed=self.removed,
            files=self.files,
            artifacts=self.artifacts,
            config_overrides=self.config_overrides,
            operations=self.operations,
            failed_gates=self.failed_gates,
        )


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def normalize_json(value: Any, what: str) -> Any:
    """Round-trip through JSON so what is hashed equals what a reader will load."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serializable: {e}") from e


def content_id(
    *,
    parent: str | None,
    tensors: dict[str, TensorEntry],
    removed: list[str],
    files: dict[str, str],
    artifacts: dict[str, str],
    config_overrides: dict[str, Any],
    operations: list[dict[str, Any]],
    failed_gates: list[dict[str, Any]] | None = None,
) -> str:
    """``v`` + 20 hex chars of sha256 over the canonical JSON of what defines the version
    (``failed_gates`` only when there are some, so published versions keep their ids)."""
    payload: dict[str, Any] = {
        "parent": parent,
        "tensors": {n: e.model_dump(exclude_defaults=True) for n, e in tensors.items()},
        "removed": sorted(removed),
        "files": files,
        "artifacts": artifacts,
        "config_overrides": config_overrides,
        "operations": operations,
    }
    if failed_gates:
        payload["failed_gates"] = failed_gates
    return "v" + hashlib.sha256(canonical_json(payload)).hexdigest()[:20]
