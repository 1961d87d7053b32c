"""What the sync and async clients share: where to connect, credentials, request builders."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import grpc

from modelsurgery.client.errors import (
    ModelSurgeryError,
    Unavailable,
    WaitTimeout,
    from_rpc_error,
    spec_refusal,
)
from modelsurgery.proto.job_state import JobState
from modelsurgery.proto.spec import JobSpec, SpecError, load_spec_file, parse_spec
from modelsurgery.v1 import checkpoints_pb2, jobs_pb2

SERVER_ENV = "MODELSURGERY_SERVER"
TOKEN_ENV = "MODELSURGERY_TOKEN"
DEFAULT_ADDRESS = "127.0.0.1:50051"
# A server on a Unix domain socket (``apply --local``): ``unix:/absolute/path/to/socket``.
UNIX_PREFIX = "unix:"
DEFAULT_TIMEOUT = 60.0
# How long a wait keeps trying to reach a server that went away before it gives up with
# Unavailable; with WATCH_SEGMENT_S (each watch stream's own deadline, after which the wait
# checks the server is still there and reopens it) a server that dies is noticed within 25 s.
RECONNECT_BUDGET_S = 15.0
WATCH_SEGMENT_S = 10.0
RECONNECT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# Unary calls without side effects, which gRPC itself retries when the server is briefly
# unavailable. Streams resume themselves (watch, download): with grpcio 1.85 a retried server
# stream whose server is killed before its first message outlives its own deadline.
_RETRIED_METHODS = {
    "JobService": ("GetJob", "ListJobs"),
    "CheckpointService": ("ListVersions", "GetVersion", "Diff", "GetAlias", "GetArtifact"),
}
_SERVICES = {**jobs_pb2.DESCRIPTOR.services_by_name, **checkpoints_pb2.DESCRIPTOR.services_by_name}
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": _SERVICES[service].full_name, "method": method}
                    for service, methods in _RETRIED_METHODS.items()
                    for method in methods
                ],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
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
    reconnect_budget: float

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
        reconnect_budget: float = RECONNECT_BUDGET_S,
    ) -> ConnectionSettings:
        """``address`` is ``host:port`` or ``unix:/absolute/socket/path``."""
        address = address or os.environ.get(SERVER_ENV) or DEFAULT_ADDRESS
        if address.startswith(UNIX_PREFIX) and not address[len(UNIX_PREFIX) :].startswith("/"):
            raise ValueError(
                f"server address {address!r}: a unix: address names an absolute socket path, "
                "e.g. unix:/run/modelsurgery/server.sock"
            )
        return cls(
            address=address,
            token=token or os.environ.get(TOKEN_ENV) or None,
            root_certificates=root_certificates.read_bytes() if root_certificates else None,
            client_cert=client_cert.read_bytes() if client_cert else None,
            client_key=client_key.read_bytes() if client_key else None,
            tls=tls or root_certificates is not None,
            timeout=timeout,
            reconnect_budget=reconnect_budget,
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
    def options(self) -> list[tuple[str, int | str]]:
        """Channel arguments: the retry policy above, and reconnect attempts at least every 2 s
        (gRPC's default backoff grows to 2 minutes), so a restarted server is found quickly."""
        return [
            ("grpc.max_receive_message_length", 8 << 20),
            ("grpc.service_config", SERVICE_CONFIG),
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]


class Deadline:
    """The overall limit of a wait on one job (``timeout`` seconds from now, or none): every
    call made for it gets the earlier of its own deadline and this one."""

    def __init__(self, job_id: str, timeout: float | None) -> None:
        self.job_id = job_id
        self.timeout = timeout
        self._at = None if timeout is None else time.monotonic() + timeout

    def cap(self, seconds: float) -> float:
        if self._at is None:
            return seconds
        return max(0.0, min(seconds, self._at - time.monotonic()))

    def check(self) -> None:
        """Raise WaitTimeout once the limit has passed."""
        if self._at is not None and time.monotonic() >= self._at:
            raise WaitTimeout(self.job_id, self.timeout or 0.0)

    def reconnect_failure(
        self, error: grpc.RpcError, settings: ConnectionSettings
    ) -> ModelSurgeryError:
        """What a failed attempt to reach the server again means: WaitTimeout when the wait's
        own limit ran out first, Unavailable when the server stayed away for the whole
        reconnect budget, else the call's own error (e.g. NotFound)."""
        try:
            self.check()
        except WaitTimeout as timeout:
            return timeout
        if error.code() in RECONNECT_CODES:
            return Unavailable(
                grpc.StatusCode.UNAVAILABLE,
                f"server {settings.address} unreachable for {settings.reconnect_budget:g} s "
                f"while waiting for job {self.job_id}",
            )
        return from_rpc_error(error)


def as_spec(spec: JobSpec | dict[str, Any] | str | Path) -> JobSpec:
    """A spec from a JobSpec, plain data, or a YAML file path; an invalid one raises the
    typed error the server would answer it with (InvalidSpec, SpecOverBound)."""
    if isinstance(spec, JobSpec):
        return spec
    try:
        return load_spec_file(spec) if isinstance(spec, str | Path) else parse_spec(spec)
    except SpecError as exc:
        raise spec_refusal(exc) from None


def submit_request(
    spec: JobSpec | dict[str, Any] | str | Path, request_id: str | None
) -> jobs_pb2.SubmitJobRequest:
    return jobs_pb2.SubmitJobRequest(spec=as_spec(spec).to_proto(), request_id=request_id or "")


def list_jobs_request(
    states: Iterable[JobState | str], page_size: int, token: str
) -> jobs_pb2.ListJobsRequest:
    """``states`` in any spelling ``JobState.from_name`` reads (``queued``, ``QUEUED``)."""
    return jobs_pb2.ListJobsRequest(
        states=[JobState.from_name(s).to_proto() for s in states],
        page_size=page_size,
        page_token=token,
    )


def set_alias_request(name: str, version_id: str, expected: Any) -> checkpoints_pb2.SetAliasRequest:
    request = checkpoints_pb2.SetAliasRequest(name=name, version_id=version_id)
    if expected is not UNSET:
        request.check_expected = True
        request.expected_version_id = expected or ""
    return request


def evaluate_request(
    ref: str, against: str | None, suite: dict[str, Any] | None, perplexity: bool
) -> checkpoints_pb2.EvaluateVersionRequest:
    """``suite``: ``{"facts": [...]}`` and/or ``{"pairs": [...]}``; None judges the stored one."""
    return checkpoints_pb2.EvaluateVersionRequest(
        ref=ref,
        against=against or "",
        suite_json=json.dumps(suite).encode() if suite is not None else b"",
        perplexity=perplexity,
    )


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


def delete_alias_request(name: str, expected: Any) -> checkpoints_pb2.DeleteAliasRequest:
    request = checkpoints_pb2.DeleteAliasRequest(name=name)
    if expected is not UNSET:
        request.check_expected = True
        request.expected_version_id = expected or ""
    return request
