"""Which server owns a RUNNING job, and how a job whose server is gone is settled.

Several servers may share one home (parallel ``apply --local`` runs, a second ``serve``): the
job table is the queue, a RUNNING job belongs to the server that claimed it (a lease it renews
every tick), and a server takes over only jobs whose owner is gone (``may_take_over_early``,
else once the lease expired). A job whose version was published settles as SUCCEEDED with that
version (``record_published``): the manifest, which names the job, is the commit point.
"""

from __future__ import annotations

import os
import socket
import uuid

from modelsurgery.checkpoints import CheckpointStore, Manifest
from modelsurgery.proto.job_state import JobState
from modelsurgery.proto.spec import JobSpec, parse_spec
from modelsurgery.server import job_table as jt
from modelsurgery.server.outcome import JobOutcome, settle_published
from modelsurgery.server.permissions import AliasPolicy, submitter

# Identities of the engines alive in this process (tests and embedded servers may run several),
# and of those that stopped (their workers killed first: none of them can still publish).
_LIVE_IN_THIS_PROCESS: set[str] = set()
_RETIRED_IN_THIS_PROCESS: set[str] = set()


def server_identity() -> str:
    """``host:pid:nonce``: unique per server start, and says where its process lives."""
    identity = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    _LIVE_IN_THIS_PROCESS.add(identity)
    return identity


def retire_identity(identity: str) -> None:
    """This process's engine ``identity`` stopped (after killing its workers): its jobs are
    anybody's to take over."""
    _LIVE_IN_THIS_PROCESS.discard(identity)
    _RETIRED_IN_THIS_PROCESS.add(identity)


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


def workers_may_outlive(owner: str) -> bool:
    """Whether a gone server's workers may still be running its jobs. A server's Ray workers
    live in processes of their own: killed (-9, OOM), the server leaves them running until
    Ray reaps them, and one may still publish. Only an engine of this process that stopped
    (``JobEngine.stop`` kills its workers first) or a row without an owner leaves none."""
    pid_text = owner.partition(":")[2].partition(":")[0]
    return pid_text.isdigit() and owner not in _RETIRED_IN_THIS_PROCESS


def may_take_over_early(job_id: str, owner: str, store: CheckpointStore) -> bool:
    """Whether a job whose lease has not expired may be taken over now: its server is gone,
    and either no worker of it can still publish or the job's version is already published
    (all a late worker still does is move the alias to that same version). Otherwise the
    lease's expiry is the bound: re-queued earlier, a job could run, and publish, twice."""
    if not owner_is_dead(owner):
        return False
    return not workers_may_outlive(owner) or store.version_of_job(job_id) is not None


def record_published(
    job: jt.JobRecord,
    published: Manifest,
    table: jt.JobTable,
    store: CheckpointStore,
    owner: str,
    policy: AliasPolicy,
    message: str,
) -> jt.JobRecord:
    """Settle ``job``, RUNNING under ``owner``, as SUCCEEDED with its published version
    (``outcome.settle_published``: gates, alias). The alias moves only while ``owner`` still
    holds the job: a server that lost it raises ``LeaseLost`` and moves nothing."""
    if not table.holds(job.id, owner):
        raise jt.LeaseLost(f"job {job.id} is no longer run by {owner}")
    try:
        spec: JobSpec | None = parse_spec(job.spec)
    except ValueError:  # a row stored before today's spec rules: the version as it is
        spec = None
    outcome = (
        settle_published(spec, published, store, submitter(job.caller, job.caller_role), policy)
        if spec is not None
        else JobOutcome(JobState.SUCCEEDED, published.id, dict(published.metrics))
    )
    return table.finish(
        job.id,
        outcome.state,
        message=message,
        owner=owner,
        **outcome.row_fields(),
    )


def settle_abandoned(
    job: jt.JobRecord,
    table: jt.JobTable,
    store: CheckpointStore,
    owner: str,
    max_attempts: int,
    policy: AliasPolicy,
    reason: str = "server restarted",
) -> jt.JobRecord:
    """A RUNNING job of ``owner`` that nothing runs any more (its server is gone, or its end
    could not be recorded: ``reason``): SUCCEEDED when its version was published, else
    CANCELLED if that was asked, re-queued while attempts remain, else FAILED."""
    published = store.version_of_job(job.id)
    if published is not None:
        message = f"{reason}; version {published.id} published"
        return record_published(job, published, table, store, owner, policy, message)
    if job.cancel_requested:
        return table.finish(job.id, JobState.CANCELLED, message=f"{reason}; cancelled", owner=owner)
    if job.attempts < max_attempts:
        return table.requeue(job.id, f"{reason}; job re-queued", owner=owner)
    return table.finish(
        job.id,
        JobState.FAILED,
        message=reason,
        error=f"{reason} while the job ran ({job.attempts} attempts)",
        owner=owner,
    )
