"""Progress events are thinned per loop and capped per job; every phase stays visible."""

from __future__ import annotations

from modelsurgery.server.event_throttle import EventThrottle


def step(n: int, message: str = "optimising") -> dict:
    return {"kind": "progress", "message": message, "step": n}


def test_steps_of_one_loop_are_thinned_and_the_newest_is_kept() -> None:
    throttle = EventThrottle(interval=1.0)
    stored = []
    for n in range(10):
        stored += throttle.offer(step(n), now=n * 0.25)
    stored += throttle.flush()
    assert [e["step"] for e in stored] == [0, 4, 8, 9]


def test_a_new_message_passes_at_once_after_the_held_step() -> None:
    throttle = EventThrottle(interval=10.0)
    stored = throttle.offer(step(0), 0.0) + throttle.offer(step(1), 0.1)
    stored += throttle.offer(step(0, "evaluating"), 0.2)
    assert [(e["message"], e["step"]) for e in stored] == [
        ("optimising", 0),
        ("optimising", 1),
        ("evaluating", 0),
    ]


def test_past_the_cap_progress_is_dropped_with_one_notice() -> None:
    throttle = EventThrottle(interval=0.0, cap=3)
    stored = []
    for n in range(10):
        stored += throttle.offer(step(n, f"phase {n}"), float(n))
    assert [e.get("step") for e in stored] == [0, 1, 2, None]
    assert stored[-1]["kind"] == "log" and "more than 3 events" in stored[-1]["message"]
    assert throttle.dropped == 7
