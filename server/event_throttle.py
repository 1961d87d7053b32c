"""Thins one job's progress events before they are stored.

A method may report every optimisation step; stored as they come, a long job writes events
faster than watchers can read them and its history grows without end. Consecutive progress
events with the same message (one loop's steps) are kept at most one per ``interval`` seconds,
the newest winning; an event with a new message always passes (after the held one), so every
phase of a job stays visible. Past ``cap`` stored events a job's progress is no longer stored,
and one notice says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Event = dict[str, Any]


@dataclass
class EventThrottle:
    interval: float = 0.5
    cap: int = 5_000
    stored: int = 0
    dropped: int = 0
    _held: Event | None = None
    _last_time: float = float("-inf")
    _last_key: tuple[Any, ...] | None = None
    _told: bool = field(default=False, repr=False)

    @staticmethod
    def _key(event: Event) -> tuple[Any, ...]:
        return (event.get("kind"), event.get("message"), event.get("operation"))

    def offer(self, event: Event, now: float) -> list[Event]:
        """The events to store now, in order (possibly none)."""
        out: list[Event] = []
        key = self._key(event)
        if key == self._last_key and now - self._last_time < self.interval:
            self._held = event
            return out
        if self._held is not None and key != self._last_key:
            out.append(self._held)
        self._held = None
        self._last_key, self._last_time = key, now
        out.append(event)
        return self._admit(out)

    def flush(self) -> list[Event]:
        """What is held back, at the end of the job."""
        held, self._held = self._held, None
        return self._admit([held] if held is not None else [])

    def _admit(self, events: list[Event]) -> list[Event]:
        room = max(0, self.cap - self.stored)
        kept, over = events[:room], events[room:]
        self.stored += len(kept)
        self.dropped += len(over)
        if over and not self._told:
            self._told = True
            kept.append(
                {
                    "kind": "log",
                    "message": f"more than {self.cap} events: further progress is not stored",
                }
            )
        return kept
