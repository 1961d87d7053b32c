"""CheckpointService: versions, lineage, diff, aliases, revert, download, import, generate."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import ray
from pydantic import ValidationError

from modelsurgery.checkpoints import (
    AliasConflictError,
    CheckpointStore,
    InvalidAliasError,
    Manifest,
    VersionNotFoundError,
)
from modelsurgery.checkpoints.resolved import resolve_lineage
from modelsurgery.evaluation.suite import SUITE_ARTIFACT, Suite
from modelsurgery.models import BUILTIN_ALIASES, ModelReferenceError, resolve_reference
from modelsurgery.models.stored import stored_artifact_names
from modelsurgery.proto import limits
from modelsurgery.server.auth import current_identity
from modelsurgery.server.convert import PAGE_TOKEN, carries_inline_data, version_to_proto
from modelsurgery.server.engine import JobEngine
from modelsurgery.server.errors import abort
from modelsurgery.server.exports import ExportCache
from modelsurgery.server.generation import GenerationStopped, PromptError
from modelsurgery.server.permissions import (
    AliasPolicy,
    PermissionDenied,
    may_see_version_data,
    require_alias_move,
)
from modelsurgery.v1 import checkpoints_pb2, checkpoints_pb2_grpc

T = TypeVar("T")

MAX_CHUNK = 3 << 20
DEFAULT_CHUNK = MAX_CHUNK
MAX_PROMPTS = limits.MAX_PROMPTS
MAX_NEW_TOKENS = limits.MAX_NEW_TOKENS
MAX_SUITE_BYTES = 3 << 20


async def read_ahead(
    path: Path, begin: int, end: int, chunk: int
) -> AsyncIterator[tuple[int, bytes]]:
    """``(offset, bytes)`` of ``path`` from ``begin`` to ``end`` in chunks of ``chunk`` bytes;
    each read runs in a thread while the chunk before it is being sent."""
    loop = asyncio.get_running_loop()
    fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)

    def read(offset: int) -> asyncio.Future[bytes] | None:
        if offset >= end:
            return None
        return loop.run_in_executor(None, os.pread, fd, min(chunk, end - offset), offset)

    def close(future: asyncio.Future[bytes] | None = None) -> None:
        if future is not None:
            future.exception()  # retrieved, so an abandoned read logs nothing
        os.close(fd)

    offset, pending = begin, read(begin)
    try:
        while pending is not None:
            # Shielded: a cancelled stream leaves the read to finish, then closes the file.
            data = await asyncio.shield(pending)
            if not data:
                raise OSError(f"{path.name} ended {end - offset} bytes early")
            pending = read(offset + len(data))
            yield offset, data
            offset += len(data)
    finally:
        if pending is None:
            close()
        else:
            pending.add_done_callback(close)


@dataclass(frozen=True)
class LineageData:
    """The versions of a lineage whose data a caller must be allowed to see: ``operations``,
    those whose operations carried data inline (the export's manifest and card show them);
    ``suite``, those that stored the evaluation suite the version resolves, byte for byte (a
    revert stores its ancestor's suite again: that ancestor's creators know the data)."""

    operations: list[str]
    suite: list[str]

    @classmethod
    def of(cls, lineage: list[Manifest]) -> LineageData:
        """``lineage``: [self, parent, ..., root]."""
        sha = resolve_lineage(lineage).artifacts.get(SUITE_ARTIFACT)
        return cls(
            operations=[m.id for m in lineage if carries_inline_data(m)],
            suite=[m.id for m in lineage if sha and m.artifacts.get(SUITE_ARTIFACT) == sha],
        )


async def cancelled_with_caller(ref: Any) -> Any:
    """The result of a worker call; if the RPC ends first (its caller went away or its
    deadline passed: grpc.aio cancels this coroutine), the Ray task is cancelled too, so the
    worker stops (or never starts) instead of working on for no one."""
    try:
        return await ref
    except asyncio.CancelledError:
        ray.cancel(ref)
        raise


class CheckpointService(checkpoints_pb2_grpc.CheckpointServiceServicer):
    def __init__(
        self,
        store: CheckpointStore,
        engine: JobEngine,
        exports: ExportCache,
        *,
        model_roots: tuple[Path, ...] | None,
        alias_policy: AliasPolicy | None = None,
    ) -> None:
        self.store = store
        self.engine = engine
        self.exports = exports
        self.model_roots = model_roots
        self.alias_policy = alias_policy or AliasPolicy()

    def _move_alias(self, name: str, version_id: str, expected: Any, field: str) -> None:
        """Move (or create) alias ``name`` as the current caller, if the alias policy lets it;
        the owner check runs under the store lock, so a racing creator cannot slip past it."""
        caller = current_identity()
        self.store.set_alias(
            name,
            version_id,
            expected=expected,
            owner=caller.name,
            authorize=self.alias_policy.authorizer(caller, name, field),
        )

    async def _manifest(
        self, ref: str, context: grpc.aio.ServicerContext, field: str = "ref"
    ) -> Manifest:
        if not ref:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "must not be empty", field)
        try:
            return await asyncio.to_thread(self.store.get, ref)
        except VersionNotFoundError:
            try:
                builtin = await self._builtin_root(ref)
            except ModelReferenceError as exc:  # its packages are not installed here
                await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc), field)
            if builtin is None:
                await abort(
                    context, grpc.StatusCode.NOT_FOUND, f"no version or alias {ref!r}", field
                )
            return builtin

    async def _builtin_root(self, ref: str) -> Manifest | None:
        """A built-in model reference (``smollm2-135m``) names the root version importing it
        makes, as it does as a job's base; the store resolves one imported already, this
        imports it now on a worker (None when ``ref`` is no built-in reference or no worker
        can import it)."""
        if ref not in BUILTIN_ALIASES:
            return None
        BUILTIN_ALIASES[ref].check_installed()
        version_id = await asyncio.to_thread(self.engine.import_reference, ref)
        return None if version_id is None else await asyncio.to_thread(self.store.get, version_id)

    async def _with_data(self, manifests: list[Manifest]) -> dict[str, bool]:
        """Version id -> whether the current caller sees its inline data (its creators and
        admins do: ``may_see_version_data``)."""
        caller = current_identity()
        if caller.is_admin or not manifests:
            return dict.fromkeys((m.id for m in manifests), True)
        creators = await asyncio.to_thread(self.engine.table.creators, [m.id for m in manifests])
        return {m.id: may_see_version_data(caller, creators[m.id]) for m in manifests}

    async def _lineage_shown(self, manifest: Manifest) -> tuple[bool, bool]:
        """(whether the current caller sees the inline data of every version in the lineage,
        whether it sees the evaluation suite the version resolves): ``may_see_version_data``
        of the versions that hold them (``LineageData``). An export shows data only when both
        hold."""
        caller = current_identity()
        if caller.is_admin:
            return True, True
        lineage = await asyncio.to_thread(self.store.lineage, manifest.id)
        held = LineageData.of(lineage)
        holders = sorted({*held.operations, *held.suite})
        creators = await asyncio.to_thread(self.engine.table.creators, holders) if holders else {}
        shown = {v: may_see_version_data(caller, creators[v]) for v in holders}
        return all(shown[v] for v in held.operations), not held.suite or any(
            shown[v] for v in held.suite
        )

    async def ListVersions(
        self, request: checkpoints_pb2.ListVersionsRequest, context: grpc.aio.ServicerContext
    ) -> checkpoints_pb2.ListVersionsResponse:
        if not 0 <= request.page_size <= 500:
            await abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "must be between 0 and 500", "page_size"
            )
        if request.page_token and not PAGE_TOKEN.fullmatch(request.page_token):
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "malformed", "page_token")
        size = request.page_size or 50
        offset = int(request.page_token or 0)
        versions = await asyncio.to_thread(self.store.list_versions)
        page = versions[offset : offset + size]
        shown = await self._with_data(page)
        return checkpoints_pb2.ListVersionsResponse(
            versions=[version_to_proto(m, with_data=shown[m.id]) for m in page],
            next_page_token=str(offset + size) if offset + size < len(versions) else "",
        )

    async def GetVersion(
        self, request: checkpoints_pb2.GetVersionRequest, context: grpc.aio.ServicerContext
    ) -> checkpoints_pb2.GetVersionResponse:
        manifest = await self._manifest(request.ref, context)
        lineage = await asyncio.to_thread(self.store.lineage, manifest.id)
        aliases = [n for n, v in self.store.list_aliases().items() if v == manifest.id]
        shown = await self._with_data([manifest])
        return checkpoints_pb2.GetVersionResponse(
            version=version_to_proto(manifest, with_data=shown[manifest.id]),
            lineage=[m.id for m in lineage],
            aliases=sorted(aliases),
        )

    async def Diff(
        self, request: checkpoints_pb2.DiffRequest, context: grpc.aio.ServicerContext
    ) -> checkpoints_pb2.DiffResponse:
        a = await self._manifest(request.a, context, "a")
        b = await self._manifest(request.b, context, "b")
        changes = await asyncio.to_thread(self.store.diff, a.id, b.id)
        return checkpoints_pb2.DiffResponse(
            changes=[
                checkpoints_pb2.TensorChange(
                    name=c.name,
                    status=c.status,
                    relative_norm=c.relative_norm
                    if c.relative_norm is not None and math.isfinite(c.relative_norm)
                    else 0.0,
                    has_relative_norm=c.relative_norm is not None,
                )
                for c in changes
            ]
        )

    async def SetAlias(
        self, request: checkpoints_pb2.SetAliasRequest, context: grpc.aio.ServicerContext
    ) -> checkpoints_pb2.SetAliasResponse:
        target = await self._manifest(request.version_id, context, "version_id")
        expected: Any = ...
        if request.check_expected:
            expected = request.expected_version_id or None
        await self._change_alias(
            context, self._move_alias, request.name, target.id, expected, "name"
        )
        return checkpoints_pb2.SetAliasResponse(name=request.name, version_id=target.id)

    async def _change_alias(
        self, context: grpc.aio.ServicerContext, change: Callable[..., T], *args: Any
    ) -> T:
        """Run a store alias change in a thread; its refusals become the caller's status
        (bad name, not the owner, compare-and-swap lost)."""
        try:
            return await asyncio.to_thread(change, *args)
        except InvalidAliasError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "name")
        except PermissionDenied as exc:
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, str(exc), exc.field)
        except AliasConflictError as exc:
            await abort(
                context, grpc.StatusCode.FAILED_PRECONDITION, str(exc), "expected_version_id"
            )

    async def GetAlias(
        self, request: checkpoints_pb2.GetAliasRequest, context: grpc.aio.ServicerContext
    ) -> checkpoints_pb2.GetAliasResponse:
        try:
            version_id = self.store.get_alias(request.name)
        except InvalidAliasError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "name")
        if version_id is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no alias {request.name!r}", "name")
        return checkpoints_pb2.GetAliasResponse(name=request.name, version_id=version_id)

    async def ListAliases(
        self, request: checkpoints_pb2.ListAliasesRequest, context: grpc.aio.ServicerContext
    ) -> checkpoints_pb2.ListAliasesResponse:
        targets = await asyncio.to_thread(self.store.list_aliases)
        owners = await asyncio.to_thread(self.store.alias_owners)
        return checkpoints_pb2.ListAliasesResponse(
            aliases=[
                checkpoints_pb2.AliasEntry(name=n, version_id=v, owner=owners.get(n, ""))
                for n, v in sorted(targets.items())
            ]
        )

    async def DeleteAlias(
        self, request: checkpoints_pb2.DeleteAliasRequest, context: grpc.aio.ServicerContext
    ) -> checkpoints_pb2.DeleteAliasResponse:
        """Only the alias's owner or an admin deletes it (``AliasPolicy``, as for moving)."""
        expected: Any = ...
        if request.check_expected:
            expected = request.expected_version_id or None
        authorize = self.alias_policy.authorizer(current_identity(), request.name, "name")
        deleted = await self._change_alias(
            context,
            functools.partial(self.store.delete_alias, expected=expected, authorize=authorize),
            request.name,
        )
        if deleted is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no alias {request.name!r}", "name")
        return checkpoints_pb2.DeleteAliasResponse(name=request.name, version_id=deleted)

    async def Revert(
        self, request: checkpoints_pb2.RevertRequest, context: grpc.aio.ServicerContext
    ) -> checkpoints_pb2.RevertResponse:
        manifest = await self._manifest(request.ref, context)
        if manifest.parent is None:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{manifest.id} is a base version; it has no parent to revert to",
                "ref",
            )
        reverted = await asyncio.to_thread(self.store.revert, manifest.id)
        return checkpoints_pb2.RevertResponse(version=version_to_proto(reverted))

    async def DownloadVersion(
        self, request: checkpoints_pb2.DownloadVersionRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[checkpoints_pb2.DownloadVersionResponse]:
        manifest = await self._manifest(request.ref, context)
        # A caller who may not see all the lineage's data downloads the redacted export.
        with_data = all(await self._lineage_shown(manifest))
        # Pinned while it streams: the export cache evicts other folders, never this one.
        with self.exports.pinned(manifest.id, with_data):
            async with contextlib.aclosing(
                self._download(manifest, with_data, request, context)
            ) as parts:
                async for part in parts:
                    yield part

    async def _download(
        self,
        manifest: Manifest,
        with_data: bool,
        request: checkpoints_pb2.DownloadVersionRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[checkpoints_pb2.DownloadVersionResponse]:
        chunk = request.chunk_size or DEFAULT_CHUNK
        if not 0 < chunk <= MAX_CHUNK:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"must be between 1 and {MAX_CHUNK} bytes",
                "chunk_size",
            )
        for name in ("offset", "length"):
            if getattr(request, name) < 0:
                await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "must be >= 0", name)
        files = self.exports.cached(manifest.id, with_data)
        if files is None:
            files = await asyncio.to_thread(self.exports.listing, manifest.id, with_data)
        paths = [f.path for f in files]
        start = 0
        if request.start_path:
            if request.start_path not in paths:
                await abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{request.start_path!r} is not a file of this version",
                    "start_path",
                )
            start = paths.index(request.start_path)
            if request.offset > files[start].size:
                await abort(context, grpc.StatusCode.OUT_OF_RANGE, "past end of file", "offset")
            if request.offset + request.length > files[start].size:
                await abort(context, grpc.StatusCode.OUT_OF_RANGE, "past end of file", "length")
        elif request.offset or request.length:
            field = "offset" if request.offset else "length"
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "needs start_path", field)
        yield checkpoints_pb2.DownloadVersionResponse(files=files, version_id=manifest.id)
        if request.files_only:
            return
        first = files[start]
        if request.length:
            ranges = [(first, request.offset, request.offset + request.length)]
        else:
            ranges = [
                (first, request.offset, first.size),
                *((f, 0, f.size) for f in files[start + 1 :]),
            ]
        folder = self.exports.path(manifest.id, with_data)
        for entry, begin, end in ranges:
            async with contextlib.aclosing(
                read_ahead(folder / entry.path, begin, end, chunk)
            ) as chunks:
                async for offset, data in chunks:
                    yield checkpoints_pb2.DownloadVersionResponse(
                        path=entry.path, offset=offset, data=data
                    )

    async def GetArtifact(
        self, request: checkpoints_pb2.GetArtifactRequest, context: grpc.aio.ServicerContext
    ) -> checkpoints_pb2.GetArtifactResponse:
        manifest = await self._manifest(request.ref, context)
        artifacts = await asyncio.to_thread(stored_artifact_names, self.store, manifest.id)
        if request.name not in artifacts:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"version {manifest.id} has no artifact {request.name!r} "
                f"(it has: {', '.join(artifacts) or 'none'})",
                "name",
            )
        if request.name == SUITE_ARTIFACT and not (await self._lineage_shown(manifest))[1]:
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{SUITE_ARTIFACT} of version {manifest.id} holds another caller's training "
                "data; only its creator or an admin may read it",
                "name",
            )
        data = await asyncio.to_thread(self.store.read_file, manifest.id, request.name)
        if len(data) > MAX_CHUNK:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{request.name} is {len(data)} bytes; use DownloadVersion for large files",
                "name",
            )
        return checkpoints_pb2.GetArtifactResponse(
            name=request.name, data=data, available=artifacts
        )

    async def ImportModel(
        self, request: checkpoints_pb2.ImportModelRequest, context: grpc.aio.ServicerContext
    ) -> checkpoints_pb2.ImportModelResponse:
        if len(request.reference) > limits.MAX_REFERENCE_CHARS:
            # As a spec's base: a longer one, echoed in the error, would overflow the trailer.
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"at most {limits.MAX_REFERENCE_CHARS} characters",
                "reference",
            )
        try:
            await asyncio.to_thread(resolve_reference, request.reference, self.model_roots)
        except (ModelReferenceError, OSError, ValueError) as exc:
            # OSError/ValueError: paths the OS rejects (NUL byte, name too long).
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "reference")
        if request.alias:
            await require_alias_move(context, self.store, self.alias_policy, request.alias, "alias")
        version_id = await self.engine.call("import_model", request.reference)
        if request.alias:
            try:
                await asyncio.to_thread(self._move_alias, request.alias, version_id, ..., "alias")
            except InvalidAliasError as exc:
                await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "alias")
            except PermissionDenied as exc:
                await abort(context, grpc.StatusCode.PERMISSION_DENIED, str(exc), exc.field)
        manifest = await asyncio.to_thread(self.store.get, version_id)
        return checkpoints_pb2.ImportModelResponse(version=version_to_proto(manifest))

    async def Generate(
        self, request: checkpoints_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> checkpoints_pb2.GenerateResponse:
        manifest = await self._manifest(request.ref, context)
        if not request.prompts or len(request.prompts) > MAX_PROMPTS:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"give 1 to {MAX_PROMPTS} prompts",
                "prompts",
            )
        max_new = request.max_new_tokens or 32
        if not 0 < max_new <= MAX_NEW_TOKENS:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"must be between 1 and {MAX_NEW_TOKENS}",
                "max_new_tokens",
            )
        if request.do_sample and not (request.temperature > 0 and 0 < (request.top_p or 1) <= 1):
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "sampling needs temperature > 0 and 0 < top_p <= 1",
                "temperature",
            )
        for index, prompt in enumerate(request.prompts):
            if len(prompt) > limits.MAX_PROMPT_CHARS:
                await abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"prompts[{index}] has {len(prompt)} characters; at most "
                    f"{limits.MAX_PROMPT_CHARS}",
                    f"prompts[{index}]",
                )
        options = {
            "max_new_tokens": max_new,
            "do_sample": request.do_sample,
            "temperature": request.temperature or 1.0,
            "top_p": request.top_p or 1.0,
            "seed": request.seed,
            "chat": request.chat,
        }
        remaining = context.time_remaining()
        timeout = min(limits.MAX_GENERATE_SECONDS, remaining or limits.MAX_GENERATE_SECONDS)
        worker = self.engine.pool.any_actor()
        try:
            completions = await cancelled_with_caller(
                worker.generate.remote(manifest.id, list(request.prompts), options, timeout)
            )
        except PromptError as exc:
            # Ray re-raises the worker's error as a subclass of it; ``cause`` is the original.
            cause = getattr(exc, "cause", exc)
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(cause), cause.field)
        except GenerationStopped:
            await abort(
                context,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"generation ran past {timeout:g} s and was stopped",
            )
        return checkpoints_pb2.GenerateResponse(completions=completions, version_id=manifest.id)

    async def EvaluateVersion(
        self, request: checkpoints_pb2.EvaluateVersionRequest, context: grpc.aio.ServicerContext
    ) -> checkpoints_pb2.EvaluateVersionResponse:
        manifest = await self._manifest(request.ref, context)
        if request.against:
            against = (await self._manifest(request.against, context, "against")).id
        elif manifest.parent is not None:
            against = manifest.parent
        else:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{manifest.id} is a root version: name a version to judge it against",
                "against",
            )
        if len(request.suite_json) > MAX_SUITE_BYTES:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"at most {MAX_SUITE_BYTES} bytes",
                "suite_json",
            )
        if request.suite_json:
            try:
                suite = Suite.model_validate_json(request.suite_json)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                await abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{where}: {first['msg']}" if where else first["msg"],
                    f"suite_json.{where}" if where else "suite_json",
                )
            if not suite.facts and not suite.pairs:
                await abort(
                    context, grpc.StatusCode.INVALID_ARGUMENT, "has no facts or pairs", "suite_json"
                )
        worker = self.engine.pool.any_actor()
        metrics, cases = await cancelled_with_caller(
            worker.evaluate.remote(manifest.id, against, request.suite_json, request.perplexity)
        )
        response = checkpoints_pb2.EvaluateVersionResponse(
            version_id=manifest.id, against=against, metrics=metrics
        )
        if request.per_case:
            # Labels quote facts and pairs: only for a caller who may see the lineage's data.
            labelled = all(await self._lineage_shown(manifest))
            response.cases.extend(
                checkpoints_pb2.EvaluationCase(
                    suite=case["suite"],
                    index=case["index"],
                    label=case["label"] if labelled else "",
                    figures=case["figures"],
                    passed=case["passed"],
                )
                for case in cases
            )
        return response
