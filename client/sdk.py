"""The synchronous Python SDK.

from modelsurgery.client import Client
with Client("127.0.0.1:50051") as client:
    job = client.submit("patch.yaml")
    job = client.wait(job.id, progress=print)
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator
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
    as_spec,
    delete_alias_request,
    evaluate_request,
    generate_request,
    list_jobs_request,
    set_alias_request,
    submit_request,
)
from modelsurgery.client.errors import JobFailed, NotFound, from_rpc_error
from modelsurgery.proto.export_record import warn_if_hooked
from modelsurgery.proto.job_state import JobState
from modelsurgery.proto.spec import JobSpec
from modelsurgery.v1 import checkpoints_pb2, checkpoints_pb2_grpc, jobs_pb2, jobs_pb2_grpc


class Client:
    """Blocking client; every call has a deadline (``timeout`` seconds unless given)."""

    def __init__(self, address: str | None = None, **settings: Any) -> None:
        self.settings = ConnectionSettings.build(address, **settings)
        credentials = self.settings.credentials()
        options = self.settings.options
        self._channel = (
            grpc.secure_channel(self.settings.address, credentials, options=options)
            if credentials
            else grpc.insecure_channel(self.settings.address, options=options)
        )
        self._jobs = jobs_pb2_grpc.JobServiceStub(self._channel)
        self._checkpoints = checkpoints_pb2_grpc.CheckpointServiceStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., Any], request: Any, timeout: float | None = None) -> Any:
        try:
            return method(
                request,
                timeout=timeout or self.settings.timeout,
                metadata=self.settings.metadata(),
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    # --- jobs ----------------------------------------------------------------------------
    def submit(
        self, spec: JobSpec | dict[str, Any] | str | Path, *, request_id: str | None = None
    ) -> jobs_pb2.Job:
        """Queue a job; resubmitting with the same request_id returns the same job while it is
        queued, running or succeeded, and a new attempt after it failed or was cancelled."""
        return self._call(self._jobs.SubmitJob, submit_request(spec, request_id)).job

    def patch_request_id(self, spec: JobSpec | dict[str, Any] | str | Path) -> str:
        """A request id that is the same exactly when the spec and the version its base
        resolves to are: re-applying the same patch to the same base returns the same job
        (and version) without new work, or re-runs it if it failed or was cancelled, while a
        moved base alias makes a new job."""
        spec = as_spec(spec)
        try:
            base = self.get_version(spec.base).version.id
        except NotFound:
            base = spec.base
        key = f"{spec.fingerprint()}\0{base}".encode()
        return "patch-" + hashlib.sha256(key).hexdigest()[:32]

    def get_job(self, job_id: str) -> jobs_pb2.Job:
        return self._call(self._jobs.GetJob, jobs_pb2.GetJobRequest(job_id=job_id)).job

    def list_jobs(
        self, states: Iterable[JobState | str] = (), page_size: int = 100
    ) -> Iterator[jobs_pb2.Job]:
        """All jobs (optionally in the given states, e.g. ``[JobState.QUEUED]`` or
        ``["queued"]``), page by page."""
        token = ""
        while True:
            page = self._call(self._jobs.ListJobs, list_jobs_request(states, page_size, token))
            yield from page.jobs
            if not page.next_page_token:
                return
            token = page.next_page_token

    def cancel(self, job_id: str) -> jobs_pb2.Job:
        return self._call(self._jobs.CancelJob, jobs_pb2.CancelJobRequest(job_id=job_id)).job

    def watch(
        self, job_id: str, after_seq: int = 0, *, timeout: float | None = None
    ) -> Iterator[jobs_pb2.JobEvent]:
        """Events until the job ends. A broken stream is reopened after the last event seen
        once the server answers again, which it must within the reconnect budget (else
        Unavailable); ``timeout`` bounds the whole watch (WaitTimeout)."""
        return self._watch(job_id, after_seq, Deadline(job_id, timeout))

    def _watch(self, job_id: str, cursor: int, deadline: Deadline) -> Iterator[jobs_pb2.JobEvent]:
        while True:
            stream = self._jobs.WatchJob(
                jobs_pb2.WatchJobRequest(job_id=job_id, after_seq=cursor),
                timeout=deadline.cap(WATCH_SEGMENT_S),
                metadata=self.settings.metadata(),
            )
            try:
                for response in stream:
                    cursor = response.event.seq
                    yield response.event
                return
            except grpc.RpcError as error:
                if error.code() not in RECONNECT_CODES:
                    raise from_rpc_error(error) from None
            deadline.check()
            self._reach(deadline)

    def _reach(self, deadline: Deadline) -> jobs_pb2.Job:
        """The job, from a server given (gRPC wait_for_ready) up to the reconnect budget to
        answer: a stream that broke or went quiet for a whole segment ends up here."""
        try:
            return self._jobs.GetJob(
                jobs_pb2.GetJobRequest(job_id=deadline.job_id),
                timeout=deadline.cap(self.settings.reconnect_budget),
                wait_for_ready=True,
                metadata=self.settings.metadata(),
            ).job
        except grpc.RpcError as error:
            raise deadline.reconnect_failure(error, self.settings) from None

    def wait(
        self,
        job_id: str,
        *,
        progress: Callable[[jobs_pb2.JobEvent], None] | None = None,
        timeout: float | None = None,
        raise_on_failure: bool = False,
    ) -> jobs_pb2.Job:
        """Block until the job ends (watching its events) and return it. ``timeout`` is an
        overall deadline (WaitTimeout once it passes); a server that stays unreachable longer
        than the reconnect budget raises Unavailable instead of hanging."""
        deadline = Deadline(job_id, timeout)
        for event in self._watch(job_id, 0, deadline):
            if progress is not None:
                progress(event)
        job = self._reach(deadline)
        if raise_on_failure and (state := JobState.from_proto(job.state)) is not JobState.SUCCEEDED:
            raise JobFailed(job, state, job.error)
        return job

    # --- versions ------------------------------------------------------------------------
    def list_versions(self, page_size: int = 100) -> Iterator[checkpoints_pb2.Version]:
        token = ""
        while True:
            page = self._call(
                self._checkpoints.ListVersions,
                checkpoints_pb2.ListVersionsRequest(page_size=page_size, page_token=token),
            )
            yield from page.versions
            if not page.next_page_token:
                return
            token = page.next_page_token

    def get_version(self, ref: str) -> checkpoints_pb2.GetVersionResponse:
        return self._call(self._checkpoints.GetVersion, checkpoints_pb2.GetVersionRequest(ref=ref))

    def diff(self, a: str, b: str) -> list[checkpoints_pb2.TensorChange]:
        response = self._call(self._checkpoints.Diff, checkpoints_pb2.DiffRequest(a=a, b=b))
        return list(response.changes)

    def set_alias(self, name: str, version_id: str, *, expected: str | None = UNSET) -> str:
        """Move an alias; with ``expected`` (None: must not exist yet) a compare-and-swap."""
        request = set_alias_request(name, version_id, expected)
        return self._call(self._checkpoints.SetAlias, request).version_id

    def get_alias(self, name: str) -> str:
        request = checkpoints_pb2.GetAliasRequest(name=name)
        return self._call(self._checkpoints.GetAlias, request).version_id

    def list_aliases(self) -> list[checkpoints_pb2.AliasEntry]:
        """Every alias (name, version id, owner), by name."""
        request = checkpoints_pb2.ListAliasesRequest()
        return list(self._call(self._checkpoints.ListAliases, request).aliases)

    def delete_alias(self, name: str, *, expected: str | None = UNSET) -> str:
        """Delete an alias (its owner or an admin); with ``expected``, only while it points
        there. Returns the version it pointed to."""
        request = delete_alias_request(name, expected)
        return self._call(self._checkpoints.DeleteAlias, request).version_id

    def revert(self, ref: str) -> checkpoints_pb2.Version:
        request = checkpoints_pb2.RevertRequest(ref=ref)
        return self._call(self._checkpoints.Revert, request).version

    def get_artifact(self, ref: str, name: str) -> bytes:
        """A small file the version carries, e.g. ``head_scores.json``."""
        request = checkpoints_pb2.GetArtifactRequest(ref=ref, name=name)
        return self._call(self._checkpoints.GetArtifact, request).data

    def import_model(self, reference: str, *, alias: str | None = None) -> checkpoints_pb2.Version:
        request = checkpoints_pb2.ImportModelRequest(reference=reference, alias=alias or "")
        return self._call(self._checkpoints.ImportModel, request, timeout=600).version

    def evaluate(
        self,
        ref: str,
        *,
        against: str | None = None,
        suite: dict[str, Any] | None = None,
        perplexity: bool = False,
        timeout: float = 900,
        per_case: bool = False,
    ) -> checkpoints_pb2.EvaluateVersionResponse:
        """Judge a version against ``against`` (default: its parent) on its stored suite and
        its lineage's, or on ``suite``, without making a version (metrics as a job's); with
        ``per_case``, each fact's and pair's own result in ``cases``."""
        request = evaluate_request(ref, against, suite, perplexity)
        request.per_case = per_case
        return self._call(self._checkpoints.EvaluateVersion, request, timeout=timeout)

    def generate(
        self,
        ref: str,
        prompts: str | list[str],
        *,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        chat: bool = False,
        timeout: float = 300,
    ) -> list[str]:
        request = generate_request(
            ref,
            prompts,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            chat=chat,
        )
        return list(self._call(self._checkpoints.Generate, request, timeout=timeout).completions)

    def predict_concepts(
        self,
        ref: str,
        texts: str | list[str],
        corrections: list[dict[str, str] | None] | None = None,
        explain: bool = False,
        *,
        timeout: float = 300,
    ) -> list[dict[str, Any]]:
        """What a concept_bottleneck version predicts per text: ``{"label", "concepts"}``.
        With ``corrections`` (one per text, None for none), each text's corrected concepts
        steer their masks first (restored after) and ``label_before``/``concepts_before``
        hold the plain prediction. With ``explain``, ``explain`` maps each concept to
        ``[[token, score], ...]``: the text's tokens with their attribution to the value
        predicted (after the intervention where there is one), scaled to [-1, 1]."""
        request = concepts_request(ref, texts, corrections, explain)
        response = self._call(self._jobs.PredictConcepts, request, timeout=timeout)
        intervened = corrections is not None
        return [concept_prediction(p, intervened, explain) for p in response.predictions]

    def download(
        self,
        ref: str,
        folder: str | Path,
        *,
        chunk_size: int = 0,
        streams: int = 4,
        max_retries: int = 5,
        progress: Callable[[int], None] | None = None,
    ) -> Path:
        """Download an exported version into ``folder``, checking every byte against the
        listing's sha256s: ranges of the files on ``streams`` concurrent streams, each resumed
        at its first unchecked piece after a disconnect. ``chunk_size`` 0 lets the server
        choose; ``progress`` gets the size of each chunk written, one call at a time, from the
        download threads. The folder loads with ``AutoModelForCausalLM.from_pretrained``; a
        version whose edit lives in hooks warns (HookedExportWarning) that it then loads as
        the unedited base (``modelsurgery.models.load(folder)`` attaches them)."""
        from modelsurgery.client import download as ranged

        call = self._channel.unary_stream(
            ranged.METHOD, request_serializer=ranged.encode, response_deserializer=ranged.decode
        )
        metadata = self.settings.metadata()
        settings = {"chunk_size": chunk_size, "max_retries": max_retries, "progress": progress}
        with ranged.Transfer(Path(folder), ref, streams=streams, **settings) as transfer:
            listing = ranged.fetch_listing(call, transfer, metadata)
            if listing is None:
                path = self._download_stream(call, ref, Path(folder), **settings)
            else:
                transfer.start(listing)
                ranged.fetch_segments(call, transfer, metadata)
                path = transfer.verify()
        warn_if_hooked(path)
        return path

    def _download_stream(
        self,
        call: grpc.UnaryStreamMultiCallable,
        ref: str,
        folder: Path,
        *,
        chunk_size: int,
        max_retries: int,
        progress: Callable[[int], None] | None,
    ) -> Path:
        """The whole folder on one stream, from a server without ranges."""
        writer = DownloadWriter(folder)
        writer.folder.mkdir(parents=True, exist_ok=True)
        retries = 0
        while True:
            stream = call(writer.request(ref, chunk_size), metadata=self.settings.metadata())
            try:
                for message in stream:
                    writer.write(message)
                    if progress is not None and message.data:
                        progress(len(message.data))
                return writer.verify()
            except grpc.RpcError as error:
                writer.interrupted()
                if error.code() not in RECONNECT_CODES or retries >= max_retries:
                    raise from_rpc_error(error) from None
                retries += 1
                time.sleep(0.5 * retries)


def concepts_request(
    ref: str,
    texts: str | list[str],
    corrections: list[dict[str, str] | None] | None,
    explain: bool = False,
) -> jobs_pb2.PredictConceptsRequest:
    """``corrections``: one per text (None or {} corrects nothing); None: no intervention."""
    listed = [texts] if isinstance(texts, str) else list(texts)
    request = jobs_pb2.PredictConceptsRequest(ref=ref, texts=listed, explain=explain)
    if corrections is not None:
        request.intervene = True
        for correction in corrections:
            request.corrections.add(concepts=correction or {})
    return request


def concept_prediction(
    prediction: jobs_pb2.ConceptPrediction, intervened: bool, explained: bool = False
) -> dict[str, Any]:
    out: dict[str, Any] = {"label": prediction.label, "concepts": dict(prediction.concepts)}
    if intervened:
        out["label_before"] = prediction.label_before
        out["concepts_before"] = dict(prediction.concepts_before)
    if explained:
        out["explain"] = {
            name: [[t.token, t.score] for t in scores.tokens]
            for name, scores in prediction.explain.items()
        }
    return out
