"""JobService: submit (validated, idempotent, quota-checked), get, list, watch, cancel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.proto import limits
from modelsurgery.proto.job_state import JobState
from modelsurgery.proto.spec import (
    SpecError,
    SpecTooLarge,
    check_stored_size,
    request_field,
    spec_from_proto,
)
from modelsurgery.server import job_table as jt
from modelsurgery.server.admission import Admission, AdmissionError, AdmittedJob
from modelsurgery.server.auth import current_identity
from modelsurgery.server.concepts import predict_concepts_rpc
from modelsurgery.server.convert import (
    PAGE_TOKEN,
    event_to_proto,
    job_to_proto,
)
from modelsurgery.server.engine import JobEngine
from modelsurgery.server.errors import abort
from modelsurgery.server.logs import log_job_submitted
from modelsurgery.server.permissions import AliasPolicy, may_see_job, require_alias_move
from modelsurgery.v1 import jobs_pb2, jobs_pb2_grpc

MAX_PAGE_SIZE = 500


def fill_page(jobs: list[jobs_pb2.Job], budget: int) -> list[jobs_pb2.Job]:
    """The leading jobs whose serialized size fits ``budget`` (at least one), so a page of
    large jobs stays under the message limit and the rest follows with ``next_page_token``."""
    page: list[jobs_pb2.Job] = []
    used = 0
    for job in jobs:
        used += job.ByteSize()
        if page and used > budget:
            break
        page.append(job)
    return page


class JobService(jobs_pb2_grpc.JobServiceServicer):
    """Parses requests and hands them over: admission checks and pins a spec, the table
    stores it, the engine runs it."""

    def __init__(
        self,
        table: jt.JobTable,
        engine: JobEngine,
        store: CheckpointStore,
        *,
        model_roots: tuple[Any, ...] | None,
        max_queued_per_caller: int,
        alias_policy: AliasPolicy | None = None,
        max_job_seconds: float = limits.DEFAULT_MAX_JOB_SECONDS,
    ) -> None:
        self.table = table
        self.alias_policy = alias_policy or AliasPolicy()
        self.engine = engine
        self.store = store
        self.max_queued_per_caller = max_queued_per_caller
        self.admission = Admission(
            store,
            model_roots=model_roots,
            max_job_seconds=max_job_seconds,
            import_reference=engine.import_reference,
            data_roots=engine.settings.worker.data_roots,
        )

    async def _admit(
        self, request: jobs_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> AdmittedJob:
        try:
            spec = spec_from_proto(request.spec)
        except SpecError as exc:
            code = (
                grpc.StatusCode.RESOURCE_EXHAUSTED
                if isinstance(exc, SpecTooLarge)
                else grpc.StatusCode.INVALID_ARGUMENT
            )
            await abort(context, code, str(exc), request_field(exc.field))
        try:
            return await asyncio.to_thread(self.admission.admit, spec)
        except AdmissionError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), f"spec.{exc.field}")

    async def SubmitJob(
        self, request: jobs_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.SubmitJobResponse:
        if len(request.request_id) > 128:
            await abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "at most 128 characters", "request_id"
            )
        admitted = await self._admit(request, context)
        spec = admitted.spec
        identity = current_identity()
        caller = identity.name
        if spec.alias:
            await require_alias_move(
                context, self.store, self.alias_policy, spec.alias, "spec.alias"
            )
        if self.table.queued_count(caller) >= self.max_queued_per_caller:
            await abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"caller {caller!r} already has {self.max_queued_per_caller} queued or running "
                "jobs; wait for some to finish",
            )
        stored = spec.to_dict()
        try:
            check_stored_size(stored)
        except SpecTooLarge as exc:
            await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), "spec")
        try:
            job, created = self.table.submit(
                request_id=request.request_id,
                caller=caller,
                spec=stored,
                fingerprint=spec.fingerprint(),
                base_version=admitted.base_version or "",
                caller_role=identity.role,
            )
        except jt.IdempotencyConflict as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "request_id")
        if created:
            log_job_submitted(job.id, caller, spec.base, [op.method for op in spec.operations])
            self.engine.wake()
            await self.engine.notify()
        return jobs_pb2.SubmitJobResponse(job=job_to_proto(job), created=created)

    async def _job(self, job_id: str, context: grpc.aio.ServicerContext) -> jt.JobRecord:
        try:
            job = self.table.get(job_id)
        except KeyError:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no job {job_id!r}", "job_id")
        if not may_see_job(current_identity(), job.caller):
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"job {job_id!r} belongs to another caller",
                "job_id",
            )
        return job

    async def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.GetJobResponse:
        return jobs_pb2.GetJobResponse(job=job_to_proto(await self._job(request.job_id, context)))

    async def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.ListJobsResponse:
        if request.page_size < 0 or request.page_size > MAX_PAGE_SIZE:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"must be between 0 and {MAX_PAGE_SIZE}",
                "page_size",
            )
        if request.page_token and not PAGE_TOKEN.fullmatch(request.page_token):
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "malformed", "page_token")
        states = []
        for value in request.states:
            try:
                states.append(JobState.from_proto(value))
            except ValueError:
                await abort(
                    context, grpc.StatusCode.INVALID_ARGUMENT, f"unknown state {value}", "states"
                )
        size = request.page_size or 50
        offset = int(request.page_token or 0)
        identity = current_identity()
        jobs = self.table.list(
            states=tuple(states),
            limit=size + 1,
            offset=offset,
            caller=None if identity.is_admin else identity.name,
        )
        page = fill_page([job_to_proto(j) for j in jobs[:size]], limits.LIST_RESPONSE_BYTES)
        more = len(page) < len(jobs)
        return jobs_pb2.ListJobsResponse(
            jobs=page, next_page_token=str(offset + len(page)) if more else ""
        )

    async def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.WatchJobResponse]:
        await self._job(request.job_id, context)
        if request.after_seq < 0:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "must be >= 0", "after_seq")
        cursor = request.after_seq
        while True:
            events = self.table.events_after(request.job_id, cursor)
            for event in events:
                cursor = event.seq
                yield jobs_pb2.WatchJobResponse(event=event_to_proto(event))
            if not events:
                if self.table.state_of(request.job_id).is_terminal:
                    return
                await self.engine.wait_for_change(1.0)

    async def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.CancelJobResponse:
        await self._job(request.job_id, context)
        try:
            job = await self.engine.cancel(request.job_id)
        except jt.StateConflict as exc:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc), "job_id")
        return jobs_pb2.CancelJobResponse(job=job_to_proto(job))

    async def PredictConcepts(
        self, request: jobs_pb2.PredictConceptsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.PredictConceptsResponse:
        worker = self.engine.pool.any_actor()
        return await predict_concepts_rpc(self.store, worker, request, context)
