"""JobState, the one spelling of a job's state: the API enum, the names users type and read, and
which states end a job, all from one definition."""

from __future__ import annotations

import pytest

from modelsurgery.proto.job_state import RERUN_STATES, TERMINAL_STATES, JobState
from modelsurgery.v1 import jobs_pb2


@pytest.mark.parametrize("state", list(JobState))
def test_every_state_round_trips_through_the_api_and_its_names(state: JobState) -> None:
    assert JobState.from_proto(state.to_proto()) is state
    assert jobs_pb2.JobState.Name(state.to_proto()) == f"JOB_STATE_{state.value}"
    for name in (state.value, state.json_name, f"JOB_STATE_{state.value}", f" {state.json_name}\n"):
        assert JobState.from_name(name) is state
    assert JobState.from_name(state) is state
    assert JobState(state.value) is state and str(state) == state.value


def test_every_api_state_but_unspecified_has_a_job_state() -> None:
    numbers = {
        value for name, value in jobs_pb2.JobState.items() if name != "JOB_STATE_UNSPECIFIED"
    }
    assert {state.to_proto() for state in JobState} == numbers


def test_names_users_see() -> None:
    assert [s.value for s in JobState] == ["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"]
    assert JobState.SUCCEEDED.json_name == "succeeded"


def test_terminal_and_rerun_states() -> None:
    ended = {s for s in JobState if s.is_terminal}
    assert ended == {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED} == TERMINAL_STATES
    assert RERUN_STATES == {JobState.FAILED, JobState.CANCELLED} < TERMINAL_STATES
    assert not JobState.QUEUED.is_terminal and not JobState.RUNNING.is_terminal


@pytest.mark.parametrize("value", [jobs_pb2.JOB_STATE_UNSPECIFIED, 99, -1])
def test_unknown_api_values_raise_naming_the_value(value: int) -> None:
    with pytest.raises(ValueError, match=rf"unknown job state {value}$"):
        JobState.from_proto(value)


@pytest.mark.parametrize("text", ["done", "", "UNSPECIFIED", "JOB_STATE_UNSPECIFIED"])
def test_unknown_names_raise_naming_the_name_and_the_known_ones(text: str) -> None:
    with pytest.raises(ValueError, match="unknown job state") as raised:
        JobState.from_name(text)
    assert repr(text) in str(raised.value)
    assert "queued, running, succeeded, failed, cancelled" in str(raised.value)
