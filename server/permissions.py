"""Who may touch what beyond a method's role: other callers' jobs and protected aliases.

Every refusal here is a ``PermissionDenied`` that the servicers answer with PERMISSION_DENIED.
"""

from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.server.auth import Caller, Role, current_identity
from modelsurgery.server.errors import abort


class PermissionDenied(Exception):
    """A caller may not do this; ``field`` names the request field at fault."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def submitter(name: str, role: str) -> Caller:
    """Who submitted a job, with the role recorded at submit, for the checks made when it
    publishes (a row stored before roles were recorded counts as a writer's)."""
    return Caller(name, Role(role) if role in set(Role) else Role.WRITER)


def may_see_version_data(caller: Caller, creators: set[str]) -> bool:
    """Whether a version's manifest is shown with the data its operations carried inline
    (facts, examples, pairs): to the callers whose jobs made it and to admins. Others see a
    count and a sha256 in its place: a version is readable by every reader, its training data
    is its creator's."""
    return caller.is_admin or caller.name in creators


def may_see_job(caller: Caller, job_caller: str) -> bool:
    """A caller sees and cancels its own jobs; an admin sees every caller's."""
    return caller.is_admin or job_caller == caller.name


@dataclass(frozen=True)
class AliasPolicy:
    """An alias belongs to the caller who created it: only that caller or an admin moves it,
    except aliases matching one of ``shared`` (fnmatch patterns), which any writer moves. An
    alias without a recorded owner (made before owners were kept, or by the local CLI) is moved
    by admins only, unless shared."""

    shared: tuple[str, ...] = ()

    def is_shared(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.shared)

    def check(self, caller: Caller, name: str, owner: str | None, field: str) -> None:
        """``owner``: the alias's owner, ``""`` if unknown, None when the alias is new."""
        if owner is None or caller.is_admin or self.is_shared(name):
            return
        if owner and owner == caller.name:
            return
        reason = "belongs to another caller" if owner else "has no recorded owner"
        raise PermissionDenied(
            f"alias {name!r} {reason}; only its owner or an admin may move it", field
        )

    def authorizer(self, caller: Caller, name: str, field: str) -> Callable[[str], None]:
        """The store's ``authorize`` callback for moving ``name`` (checked under its lock)."""

        def authorize(owner: str) -> None:
            self.check(caller, name, owner, field)

        return authorize


async def require_alias_move(
    context: grpc.aio.ServicerContext,
    store: CheckpointStore,
    policy: AliasPolicy,
    name: str,
    field: str,
) -> None:
    """End the call with PERMISSION_DENIED unless the current caller may move alias ``name``
    (checked early, before work is done; the move itself checks again under the store lock)."""
    owner = await asyncio.to_thread(store.alias_owner, name)
    try:
        policy.check(current_identity(), name, owner, field)
    except PermissionDenied as exc:
        await abort(context, grpc.StatusCode.PERMISSION_DENIED, str(exc), exc.field)
