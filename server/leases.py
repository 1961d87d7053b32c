"""Which server owns a RUNNING job, and how a job whose server is gone is settled.

Several servers may share one home (parallel ``apply --local`` runs, a second ``serve``): the
job table is the queue, a RUNNING job belongs to the server that claimed it (a lease it renews
every tick), and a server takes over only jobs whose owner is gone (lease expired, or its
process no longer exists on this host). A job whose version was published before its server
died settles as SUCCEEDED with that version (``outcome.settle_published``): the manifest,
which names the job, is the commit point.
"""

from __future__ import annotations

import os
import socket
import uuid

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.proto.job_state import JobState
from modelsurgery.proto.spec import JobSpec, parse_spec
from modelsurgery.server import job_table as jt
from modelsurgery.server.outcome import JobOutcome, settle_published

# Identities of the engines alive in this process (tests and embedded servers may run several).
_LIVE_IN_THIS_PROCESS: set[str] = set()


def server_identity() -> str:
    """``host:pid:nonce``: unique per server start, and says where its process lives."""
    identity = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    _LIVE_IN_THIS_PROCESS.add(identity)
    return identity


def retire_identity(identity: str) -> None:
    """This process's engine ``identity`` stopped: its jobs are anybody's to take over."""
    _LIVE_IN_THIS_PROCESS.discard(identity)


def owner_is_dead(owner: str) -> bool:
    """Whether the server that claimed a job is known to be gone: no owner (an older
    database), an engine of this process that stopped (or of an earlier process with this
    pid), or a process that no longer exists on this host. Owners on other hosts are judged
    by their lease alone."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if not owner or not pid_text.isdigit():
        return True
    if host != socket.gethostname():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return owner not in _LIVE_IN_THIS_PROCESS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def settle_abandoned(
    job: jt.JobRecord,
    table: jt.JobTable,
    store: CheckpointStore,
    owner: str,
    max_attempts: int,
) -> jt.JobRecord:
    """A job taken over by ``owner``: SUCCEEDED when its version was published, else
    CANCELLED if that was asked, re-queued while attempts remain, else FAILED."""
    published = store.version_of_job(job.id)
    if published is not None:
        try:
            spec: JobSpec | None = parse_spec(job.spec)
        except ValueError:  # a row stored before today's spec rules: the version as it is
            spec = None
        outcome = (
            settle_published(spec, published, store, job.caller)
            if spec is not None
            else JobOutcome(JobState.SUCCEEDED, published.id, dict(published.metrics))
        )
        return table.finish(
            job.id,
            outcome.state,
            message=f"version {published.id} published (recorded after a server restart)",
            version_id=outcome.version_id,
            metrics=outcome.metrics,
            gates=[g.to_dict() for g in outcome.gates],
            owner=owner,
        )
    if job.cancel_requested:
        return table.finish(
            job.id, JobState.CANCELLED, message="cancelled; server restarted", owner=owner
        )
    if job.attempts < max_attempts:
        return table.requeue(job.id, "server restarted; job re-queued", owner=owner)
    return table.finish(
        job.id,
        JobState.FAILED,
        message="server restarted",
        error=f"server restarted while the job ran ({job.attempts} attempts)",
        owner=owner,
    )
