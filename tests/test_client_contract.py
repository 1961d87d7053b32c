"""What CI relies on from the client: exit codes by outcome, and waits that end on time (an
overall deadline, a bounded reconnect budget) against a real gRPC server in this process."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
import pytest

from modelsurgery.client import AsyncClient, Client, Unavailable, WaitTimeout
from modelsurgery.client.cli import _exit_code
from modelsurgery.client.cli_common import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_INFRASTRUCTURE,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_TIMEOUT,
    classify,
)
from modelsurgery.client.errors import JobFailed, ModelSurgeryError
from modelsurgery.proto.spec import SpecError
from modelsurgery.v1 import jobs_pb2, jobs_pb2_grpc

RUNNING, SUCCEEDED = jobs_pb2.JOB_STATE_RUNNING, jobs_pb2.JOB_STATE_SUCCEEDED
BUDGET = 1.0  # reconnect budget of the clients here, so a lost server shows within seconds
# gRPC sends a deadline as a rounded-up timeout, so the server can see a little more than the
# client asked for; the checks tell the wait's deadline from the 10 s segment or 30 s budget.
WIRE_SLACK = 0.1


@pytest.mark.parametrize(
    ("error", "exit_code"),
    [
        (WaitTimeout("job-1", 5), EXIT_TIMEOUT),
        (ModelSurgeryError(grpc.StatusCode.UNAVAILABLE, "connection refused"), EXIT_INFRASTRUCTURE),
        (ModelSurgeryError(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer"), EXIT_INFRASTRUCTURE),
        (ModelSurgeryError(grpc.StatusCode.INTERNAL, "boom"), EXIT_INFRASTRUCTURE),
        (ModelSurgeryError(grpc.StatusCode.UNKNOWN, "boom"), EXIT_INFRASTRUCTURE),
        (ModelSurgeryError(grpc.StatusCode.INVALID_ARGUMENT, "bad", "spec.base"), EXIT_INVALID),
        (ModelSurgeryError(grpc.StatusCode.UNAUTHENTICATED, "no token"), EXIT_INVALID),
        (SpecError("operations[0].method", "unknown method"), EXIT_INVALID),
        (JobFailed(None, "JOB_STATE_FAILED", "gate"), EXIT_FAILED),
        (JobFailed(None, "JOB_STATE_CANCELLED", ""), EXIT_CANCELLED),
    ],
)
def test_errors_map_to_exit_codes(error: Exception, exit_code: int) -> None:
    reported = classify(error)
    assert reported is not None and reported.exit_code == exit_code
    if isinstance(error, ModelSurgeryError):
        assert (reported.code, reported.field) == (error.code.name, error.field)


def test_unexpected_errors_are_not_classified() -> None:
    assert classify(RuntimeError("a bug")) is None


def test_job_states_map_to_exit_codes() -> None:
    codes = {
        state: _exit_code(jobs_pb2.Job(state=state))
        for state in (SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)
    }
    assert list(codes.values()) == [EXIT_OK, EXIT_FAILED, EXIT_CANCELLED]


def test_wait_timeout_is_typed() -> None:
    error = WaitTimeout("job-1", 5)
    assert isinstance(error, TimeoutError)
    assert (error.code, error.field) == (grpc.StatusCode.DEADLINE_EXCEEDED, "timeout")
    assert str(error) == "DEADLINE_EXCEEDED: job job-1 did not end within 5 s"


class PlayedJob(jobs_pb2_grpc.JobServiceServicer):
    """A JobService holding one job in the state the test gives it. WatchJob keeps the real
    contract: events after the cursor (1: queued, 2: the end), then a stream that stays open
    and silent while the job runs, ending once the job has. ``reachable=False`` plays a server
    the client cannot get through to: every watch breaks and GetJob never answers. Each call
    records the time the client gave it (its deadline, as the server sees it)."""

    def __init__(self, state: int, reachable: bool = True) -> None:
        self.state = state
        self.reachable = reachable
        self.deadlines: dict[str, list[float]] = {"WatchJob": [], "GetJob": []}

    def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.GetJobResponse:
        self.deadlines["GetJob"].append(context.time_remaining())
        while not self.reachable and context.is_active():
            time.sleep(0.02)
        return jobs_pb2.GetJobResponse(job=jobs_pb2.Job(id=request.job_id, state=self.state))

    def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[jobs_pb2.WatchJobResponse]:
        self.deadlines["WatchJob"].append(context.time_remaining())
        if not self.reachable:
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")

        def event(seq: int, state: int) -> jobs_pb2.WatchJobResponse:
            return jobs_pb2.WatchJobResponse(
                event=jobs_pb2.JobEvent(job_id=request.job_id, seq=seq, state=state)
            )

        if request.after_seq < 1:
            yield event(1, jobs_pb2.JOB_STATE_QUEUED)
        while self.state == RUNNING:
            if not context.is_active():
                return
            time.sleep(0.02)
        yield event(2, self.state)


@contextmanager
def played_server(
    state: int, port: int = 0, reachable: bool = True
) -> Iterator[tuple[grpc.Server, str, PlayedJob]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    played = PlayedJob(state, reachable)
    jobs_pb2_grpc.add_JobServiceServicer_to_server(played, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield server, f"127.0.0.1:{port}", played
    finally:
        server.stop(0)


def raised(call: Callable[[], object]) -> ModelSurgeryError:
    """The typed error ``call()`` raised."""
    with pytest.raises(ModelSurgeryError) as err:
        call()
    return err.value


def test_wait_timeout_is_an_overall_deadline() -> None:
    """Every call of the wait carries its 1 s deadline (not the 10 s watch segment) and the
    wait ends in WaitTimeout."""
    events: list[jobs_pb2.JobEvent] = []
    with played_server(RUNNING) as (_, address, job), Client(address, reconnect_budget=BUDGET) as c:
        error = raised(lambda: c.wait("job-1", timeout=1, progress=events.append))
    assert isinstance(error, WaitTimeout) and (error.job_id, error.timeout) == ("job-1", 1)
    assert job.deadlines["WatchJob"] and max(job.deadlines["WatchJob"]) <= 1 + WIRE_SLACK
    assert [e.seq for e in events] == [1]


def test_wait_gives_up_when_the_server_is_gone_past_the_budget() -> None:
    with (
        played_server(RUNNING) as (server, address, job),
        Client(address, reconnect_budget=BUDGET) as c,
    ):
        threading.Timer(0.5, server.stop, args=(0,)).start()
        error = raised(lambda: c.wait("job-1"))
    assert isinstance(error, Unavailable) and error.code == grpc.StatusCode.UNAVAILABLE
    assert "unreachable for 1 s" in error.message
    assert len(job.deadlines["WatchJob"]) == 1  # gave up on the server, did not watch again


def test_wait_timeout_still_wins_while_reconnecting() -> None:
    """With the server unreachable, a timeout shorter than the reconnect budget ends the wait:
    the reconnecting call is given what is left of the 1.5 s, not the 30 s budget."""
    with (
        played_server(RUNNING, reachable=False) as (_, address, job),
        Client(address, reconnect_budget=30) as c,
    ):
        error = raised(lambda: c.wait("job-1", timeout=1.5))
    assert isinstance(error, WaitTimeout) and error.timeout == 1.5
    assert job.deadlines["GetJob"] and max(job.deadlines["GetJob"]) <= 1.5 + WIRE_SLACK


def test_wait_resumes_after_a_restart_within_the_budget() -> None:
    """The new server on the same port is found (gRPC's reconnect, wait_for_ready) and the
    watch goes on from the last event seen."""
    done = threading.Event()
    events: list[jobs_pb2.JobEvent] = []
    with played_server(RUNNING) as (server, address, _):
        port = int(address.rsplit(":", 1)[1])

        def restart() -> None:
            server.stop(0).wait()
            with played_server(SUCCEEDED, port):
                done.wait(30)

        restarter = threading.Timer(0.3, restart)
        with Client(address, reconnect_budget=5) as client:
            restarter.start()
            try:
                job = client.wait("job-1", progress=events.append)
            finally:
                done.set()
                restarter.join()
    assert job.state == SUCCEEDED
    assert [e.seq for e in events] == [1, 2]


def test_async_wait_has_the_same_deadline_and_budget() -> None:
    async def outcome(client: AsyncClient, timeout: float | None) -> Exception:
        with pytest.raises(ModelSurgeryError) as err:
            await client.wait("job-1", timeout=timeout)
        return err.value

    async def scenario(server: grpc.Server, address: str) -> list[Exception]:
        async with AsyncClient(address, reconnect_budget=BUDGET) as client:
            timed_out = await outcome(client, 1)
            threading.Timer(0.3, server.stop, args=(0,)).start()
            return [timed_out, await outcome(client, None)]

    with played_server(RUNNING) as (server, address, job):
        timeout, gone = asyncio.run(scenario(server, address))
    assert isinstance(timeout, WaitTimeout) and timeout.timeout == 1
    assert job.deadlines["WatchJob"][0] <= 1 + WIRE_SLACK
    assert isinstance(gone, Unavailable) and "unreachable for 1 s" in gone.message
