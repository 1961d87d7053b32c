"""The asyncio Python SDK: the same calls as ``Client``, awaitable.

async with AsyncClient() as client:
    job = await client.submit(spec)
    job = await client.wait(job.id)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from modelsurgery.client.connection import (
    RECONNECT_CODES,
    UNSET,
    WATCH_SEGMENT_S,
    ConnectionSettings,
    Deadline,
    DownloadWriter,
    delete_alias_request,
    evaluate_request,
    generate_request,
    list_jobs_request,
    set_alias_request,
    submit_request,
)
from modelsurgery.client.errors import JobFailed, from_rpc_error
from modelsurgery.proto.export_record import warn_if_hooked
from modelsurgery.proto.job_state import JobState
from modelsurgery.proto.spec import JobSpec
from modelsurgery.v1 import checkpoints_pb2, checkpoints_pb2_grpc, jobs_pb2, jobs_pb2_grpc


class AsyncClient:
    def __init__(self, address: str | None = None, **settings: Any) -> None:
        self.settings = ConnectionSettings.build(address, **settings)
        credentials = self.settings.credentials()
        options = self.settings.options
        self._channel = (
            grpc.aio.secure_channel(self.settings.address, credentials, options=options)
            if credentials
            else grpc.aio.insecure_channel(self.settings.address, options=options)
        )
        self._jobs = jobs_pb2_grpc.JobServiceStub(self._channel)
        self._checkpoints = checkpoints_pb2_grpc.CheckpointServiceStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(
        self, method: Callable[..., Any], request: Any, timeout: float | None = None
    ) -> Any:
        try:
            return await method(
                request, timeout=timeout or self.settings.timeout, metadata=self.settings.metadata()
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    async def submit(
        self, spec: JobSpec | dict[str, Any] | str | Path, *, request_id: str | None = None
    ) -> jobs_pb2.Job:
        return (await self._call(self._jobs.SubmitJob, submit_request(spec, request_id))).job

    async def get_job(self, job_id: str) -> jobs_pb2.Job:
        return (await self._call(self._jobs.GetJob, jobs_pb2.GetJobRequest(job_id=job_id))).job

    async def list_jobs(
        self, states: Iterable[JobState | str] = (), page_size: int = 100
    ) -> AsyncIterator[jobs_pb2.Job]:
        token = ""
        while True:
            request = list_jobs_request(states, page_size, token)
            page = await self._call(self._jobs.ListJobs, request)
            for job in page.jobs:
                yield job
            if not page.next_page_token:
                return
            token = page.next_page_token

    async def cancel(self, job_id: str) -> jobs_pb2.Job:
        request = jobs_pb2.CancelJobRequest(job_id=job_id)
        return (await self._call(self._jobs.CancelJob, request)).job

    def watch(
        self, job_id: str, after_seq: int = 0, *, timeout: float | None = None
    ) -> AsyncIterator[jobs_pb2.JobEvent]:
        """Events until the job ends; reconnects and deadlines as in ``Client.watch``."""
        return self._watch(job_id, after_seq, Deadline(job_id, timeout))

    async def _watch(
        self, job_id: str, cursor: int, deadline: Deadline
    ) -> AsyncIterator[jobs_pb2.JobEvent]:
        while True:
            stream = self._jobs.WatchJob(
                jobs_pb2.WatchJobRequest(job_id=job_id, after_seq=cursor),
                timeout=deadline.cap(WATCH_SEGMENT_S),
                metadata=self.settings.metadata(),
            )
            try:
                async for response in stream:
                    cursor = response.event.seq
                    yield response.event
                return
            except grpc.RpcError as error:
                if error.code() not in RECONNECT_CODES:
                    raise from_rpc_error(error) from None
            deadline.check()
            await self._reach(deadline)

    async def _reach(self, deadline: Deadline) -> jobs_pb2.Job:
        """The job, from a server given (wait_for_ready) up to the reconnect budget to answer."""
        try:
            response = await self._jobs.GetJob(
                jobs_pb2.GetJobRequest(job_id=deadline.job_id),
                timeout=deadline.cap(self.settings.reconnect_budget),
                wait_for_ready=True,
                metadata=self.settings.metadata(),
            )
        except grpc.RpcError as error:
            raise deadline.reconnect_failure(error, self.settings) from None
        return response.job

    async def wait(
        self,
        job_id: str,
        *,
        progress: Callable[[jobs_pb2.JobEvent], None] | None = None,
        timeout: float | None = None,
        raise_on_failure: bool = False,
    ) -> jobs_pb2.Job:
        """As ``Client.wait``: ``timeout`` is an overall deadline (WaitTimeout)."""
        deadline = Deadline(job_id, timeout)
        async for event in self._watch(job_id, 0, deadline):
            if progress is not None:
                progress(event)
        job = await self._reach(deadline)
        if raise_on_failure and (state := JobState.from_proto(job.state)) is not JobState.SUCCEEDED:
            raise JobFailed(job, state, job.error)
        return job

    async def get_version(self, ref: str) -> checkpoints_pb2.GetVersionResponse:
        request = checkpoints_pb2.GetVersionRequest(ref=ref)
        return await self._call(self._checkpoints.GetVersion, request)

    async def list_versions(self, page_size: int = 100) -> AsyncIterator[checkpoints_pb2.Version]:
        token = ""
        while True:
            request = checkpoints_pb2.ListVersionsRequest(page_size=page_size, page_token=token)
            page = await self._call(self._checkpoints.ListVersions, request)
            for version in page.versions:
                yield version
            if not page.next_page_token:
                return
            token = page.next_page_token

    async def diff(self, a: str, b: str) -> list[checkpoints_pb2.TensorChange]:
        request = checkpoints_pb2.DiffRequest(a=a, b=b)
        return list((await self._call(self._checkpoints.Diff, request)).changes)

    async def set_alias(self, name: str, version_id: str, *, expected: str | None = UNSET) -> str:
        request = set_alias_request(name, version_id, expected)
        return (await self._call(self._checkpoints.SetAlias, request)).version_id

    async def get_alias(self, name: str) -> str:
        request = checkpoints_pb2.GetAliasRequest(name=name)
        return (await self._call(self._checkpoints.GetAlias, request)).version_id

    async def list_aliases(self) -> list[checkpoints_pb2.AliasEntry]:
        request = checkpoints_pb2.ListAliasesRequest()
        return list((await self._call(self._checkpoints.ListAliases, request)).aliases)

    async def delete_alias(self, name: str, *, expected: str | None = UNSET) -> str:
        request = delete_alias_request(name, expected)
        return (await self._call(self._checkpoints.DeleteAlias, request)).version_id

    async def revert(self, ref: str) -> checkpoints_pb2.Version:
        request = checkpoints_pb2.RevertRequest(ref=ref)
        return (await self._call(self._checkpoints.Revert, request)).version

    async def get_artifact(self, ref: str, name: str) -> bytes:
        request = checkpoints_pb2.GetArtifactRequest(ref=ref, name=name)
        return (await self._call(self._checkpoints.GetArtifact, request)).data

    async def evaluate(
        self,
        ref: str,
        *,
        against: str | None = None,
        suite: dict[str, Any] | None = None,
        perplexity: bool = False,
        timeout: float = 900,
        per_case: bool = False,
    ) -> checkpoints_pb2.EvaluateVersionResponse:
        request = evaluate_request(ref, against, suite, perplexity)
        request.per_case = per_case
        return await self._call(self._checkpoints.EvaluateVersion, request, timeout=timeout)

    async def import_model(
        self, reference: str, *, alias: str | None = None
    ) -> checkpoints_pb2.Version:
        request = checkpoints_pb2.ImportModelRequest(reference=reference, alias=alias or "")
        return (await self._call(self._checkpoints.ImportModel, request, timeout=600)).version

    async def generate(
        self, ref: str, prompts: str | list[str], *, timeout: float = 300, **options: Any
    ) -> list[str]:
        defaults = {
            "max_new_tokens": 32,
            "do_sample": False,
            "temperature": 1.0,
            "top_p": 1.0,
            "seed": 0,
            "chat": False,
        }
        request = generate_request(ref, prompts, **{**defaults, **options})
        response = await self._call(self._checkpoints.Generate, request, timeout=timeout)
        return list(response.completions)

    async def download(
        self,
        ref: str,
        folder: str | Path,
        *,
        chunk_size: int = 0,
        streams: int = 4,
        max_retries: int = 5,
    ) -> Path:
        """As ``Client.download`` (ranges on ``streams`` concurrent streams, every byte
        checked), hooked-version warning included."""
        from modelsurgery.client import download as ranged

        call = self._channel.unary_stream(
            ranged.METHOD, request_serializer=ranged.encode, response_deserializer=ranged.decode
        )
        metadata = self.settings.metadata()
        settings = {"chunk_size": chunk_size, "max_retries": max_retries}
        with ranged.Transfer(Path(folder), ref, streams=streams, **settings) as transfer:
            listing = await ranged.fetch_listing_async(call, transfer, metadata)
            if listing is None:
                path = await self._download_stream(call, ref, Path(folder), **settings)
            else:
                await asyncio.to_thread(transfer.start, listing)
                await ranged.fetch_segments_async(call, transfer, metadata)
                path = transfer.verify()
        warn_if_hooked(path)
        return path

    async def _download_stream(
        self,
        call: grpc.aio.UnaryStreamMultiCallable,
        ref: str,
        folder: Path,
        *,
        chunk_size: int,
        max_retries: int,
    ) -> Path:
        """The whole folder on one stream, from a server without ranges."""
        writer = DownloadWriter(folder)
        writer.folder.mkdir(parents=True, exist_ok=True)
        retries = 0
        while True:
            stream = call(writer.request(ref, chunk_size), metadata=self.settings.metadata())
            try:
                async for message in stream:
                    writer.write(message)
                return writer.verify()
            except grpc.RpcError as error:
                writer.interrupted()
                if error.code() not in RECONNECT_CODES or retries >= max_retries:
                    raise from_rpc_error(error) from None
                retries += 1
                await asyncio.sleep(0.5 * retries)
