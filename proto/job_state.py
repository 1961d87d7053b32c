"""A job's state: the one spelling shared by the job table, the servicers, the SDK and the CLI.

Torch-free (the thin client imports it). The table stores ``JobState.value``, the API sends the
``JOB_STATE_*`` enum, JSON output and the CLI show the value (``SUCCEEDED``), and users may type
any case (``--state succeeded``).
"""

from __future__ import annotations

from enum import StrEnum

from modelsurgery.v1 import jobs_pb2

# How the API enum spells a state's name, and how MessageToDict writes it: ``JOB_STATE_QUEUED``.
PROTO_PREFIX = "JOB_STATE_"


class JobState(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES

    def to_proto(self) -> int:
        return jobs_pb2.JobState.Value(PROTO_PREFIX + self.value)

    @classmethod
    def from_proto(cls, value: int) -> JobState:
        """The state of an API enum value (ValueError for UNSPECIFIED or an unknown number)."""
        try:
            name = jobs_pb2.JobState.Name(value)
        except ValueError:
            raise ValueError(f"unknown job state {value}") from None
        if name == PROTO_PREFIX + "UNSPECIFIED":
            raise ValueError(f"unknown job state {value}")
        return cls(name.removeprefix(PROTO_PREFIX))

    @property
    def json_name(self) -> str:
        """The lower-case name users type (``--state succeeded``) and error messages list."""
        return self.value.lower()

    @classmethod
    def from_name(cls, text: str) -> JobState:
        """Parse any spelling a user types or JSON holds: ``succeeded``, ``SUCCEEDED``,
        ``JOB_STATE_SUCCEEDED``."""
        key = text.strip().upper().removeprefix(PROTO_PREFIX)
        try:
            return cls(key)
        except ValueError:
            known = ", ".join(s.json_name for s in cls)
            raise ValueError(f"unknown job state {text!r}; known: {known}") from None


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
RERUN_STATES = frozenset({JobState.FAILED, JobState.CANCELLED})
