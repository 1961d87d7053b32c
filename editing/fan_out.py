"""How a method spreads independent pieces of work over the workers it is given.

A method hands ``context.fan_out`` a task (a module-level function, so a remote worker can
import it), its model and tokenizer, and the payloads; it gets ``(index, result)`` pairs back
in completion order. ``run_here`` runs them one after another in the calling process; the
server's Ray fan-out (``server.fan_out``) runs them on helper actors that hold a copy of the
model. Results must not depend on where a payload ran, so a task is a pure function of its
model and payload.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from modelsurgery.editing.registry import MethodContext

FanOutTask = Callable[[Any, Any, Any, "MethodContext"], Any]


class FanOut(Protocol):
    def __call__(
        self,
        task: FanOutTask,
        model: Any,
        tokenizer: Any,
        payloads: Sequence[Any],
        context: MethodContext,
    ) -> Iterator[tuple[int, Any]]: ...


def run_here(
    task: FanOutTask,
    model: Any,
    tokenizer: Any,
    payloads: Sequence[Any],
    context: MethodContext,
) -> Iterator[tuple[int, Any]]:
    """Every payload in this process, in order, with the job's own context (its progress
    events and cancellation reach the task)."""
    for index, payload in enumerate(payloads):
        yield index, task(model, tokenizer, payload, context)
