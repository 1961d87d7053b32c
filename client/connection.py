"""What the sync and async clients share: where to connect, credentials, request builders."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import grpc

from modelsurgery.proto.spec import JobSpec, load_spec_file, parse_spec
from modelsurgery.v1 import checkpoints_pb2, jobs_pb2

SERVER_ENV = "MODELSURGERY_SERVER"
TOKEN_ENV = "MODELSURGERY_TOKEN"
DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 60.0
TERMINAL_STATES = frozenset(
    {jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED}
)
STATE_NAMES = {value: name.removeprefix("JOB_STATE_") for name, value in jobs_pb2.JobState.items()}
UNSET: Any = ...


@dataclass(frozen=True)
class ConnectionSettings:
    address: str
    token: str | None
    root_certificates: bytes | None
    client_cert: bytes | None
    client_key: bytes | None
    tls: bool
    timeout: float

    @classmethod
    def build(
        cls,
        address: str | None = None,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: Path | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> ConnectionSettings:
        return cls(
            address=address or os.environ.get(SERVER_ENV) or DEFAULT_ADDRESS,
            token=token or os.environ.get(TOKEN_ENV) or None,
            root_certificates=root_certificates.read_bytes() if root_certificates else None,
            client_cert=client_cert.read_bytes() if client_cert else None,
            client_key=client_key.read_bytes() if client_key else None,
            tls=tls or root_certificates is not None,
            timeout=timeout,
        )

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.client_key,
            certificate_chain=self.client_cert,
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    @property
    def options(self) -> list[tuple[str, int]]:
        return [("grpc.max_receive_message_length", 8 << 20)]


def as_spec(spec: JobSpec | dict[str, Any] | str | Path) -> JobSpec:
    """A spec from a JobSpec, plain data, or a YAML file path."""
    if isinstance(spec, JobSpec):
        return spec
    if isinstance(spec, str | Path):
        return load_spec_file(spec)
    return parse_spec(spec)


def submit_request(
    spec: JobSpec | dict[str, Any] | str | Path, request_id: str | None
) -> jobs_pb2.SubmitJobRequest:
    return jobs_pb2.SubmitJobRequest(spec=as_spec(spec).to_proto(), request_id=request_id or "")


def list_jobs_request(
    states: Iterable[str], page_size: int, token: str
) -> jobs_pb2.ListJobsRequest:
    return jobs_pb2.ListJobsRequest(
        states=[jobs_pb2.JobState.Value(f"JOB_STATE_{s.upper()}") for s in states],
        page_size=page_size,
        page_token=token,
    )


def set_alias_request(name: str, version_id: str, expected: Any) -> checkpoints_pb2.SetAliasRequest:
    request = checkpoints_pb2.SetAliasRequest(name=name, version_id=version_id)
    if expected is not UNSET:
        request.check_expected = True
        request.expected_version_id = expected or ""
    return request


def generate_request(
    ref: str,
    prompts: str | list[str],
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    seed: int,
    chat: bool,
) -> checkpoints_pb2.GenerateRequest:
    return checkpoints_pb2.GenerateRequest(
        ref=ref,
        prompts=[prompts] if isinstance(prompts, str) else list(prompts),
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        chat=chat,
    )


class DownloadWriter:
    """Writes a DownloadVersion stream into a folder, hashing as it goes, and knows where to
    resume after a break (the file being written and the bytes it already has)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: list[checkpoints_pb2.ExportedFile] = []
        self.path = ""
        self.offset = 0
        self._handle: BinaryIO | None = None
        self._hasher: Any = None
        self._digests: dict[str, str] = {}

    def request(self, ref: str, chunk_size: int) -> checkpoints_pb2.DownloadVersionRequest:
        return checkpoints_pb2.DownloadVersionRequest(
            ref=ref, start_path=self.path, offset=self.offset, chunk_size=chunk_size
        )

    def _target(self, relative: str) -> Path:
        target = (self.folder / relative).resolve()
        if not target.is_relative_to(self.folder.resolve()):
            raise ValueError(f"server sent a path outside the download folder: {relative!r}")
        return target

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._digests[self.path] = self._hasher.hexdigest()
            self._handle = None

    def _open(self, relative: str, offset: int) -> None:
        self._close()
        target = self._target(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        self._hasher = hashlib.sha256()
        if offset:
            handle = target.open("r+b")
            remaining = offset
            while remaining and (block := handle.read(min(remaining, 1 << 22))):
                self._hasher.update(block)
                remaining -= len(block)
            handle.seek(offset)
            handle.truncate()
        else:
            handle = target.open("wb")
        self._handle = handle
        self.path = relative

    def write(self, message: checkpoints_pb2.DownloadVersionResponse) -> None:
        if message.files:
            self.files = list(message.files)
            return
        if self._handle is None or message.path != self.path:
            self._open(message.path, message.offset)
        assert self._handle is not None
        self._handle.write(message.data)
        self._hasher.update(message.data)
        self.offset = message.offset + len(message.data)

    def interrupted(self) -> None:
        """Flush what arrived before a broken stream; the next request resumes after it."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def verify(self) -> Path:
        """Every listed file is complete and matches its sha256."""
        self._close()
        for entry in self.files:
            target = self._target(entry.path)
            digest = self._digests.get(entry.path)
            if digest is None:
                if not target.exists() and entry.size == 0:
                    target.touch()
                if not target.exists():
                    raise OSError(f"download incomplete: {entry.path} missing")
                digest = hashlib.sha256(target.read_bytes()).hexdigest()
            if digest != entry.sha256:
                raise OSError(f"download corrupt: {entry.path} sha256 mismatch")
        return self.folder
