"""The metric names a job reports, which are also its gate names, and which of them a job can
produce: checked at submit so a misspelt or unproducible gate fails before any work is done.

- unprefixed: the final model against the job's base version, on the suites its operations
  carry (facts, contrast pairs) and on WikiText-2 perplexity;
- ``lineage_*``: the suites stored with every ancestor version, re-run on the final model;
- ``op<i>.<name>``: operation ``i``'s (0-based, as in ``operations[i]``) own figures;
- ``job_seconds``, ``eval_seconds``.

Torch-free: the client validates specs with it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from modelsurgery.proto import limits

FACTS = "facts"
PAIRS = "pairs"

FACT_METRICS = ("efficacy", "paraphrase", "locality", "probability_gain")
PAIR_METRICS = ("stereotype_share", "stereotype_share_base", "bias_gap", "bias_gap_base")
PERPLEXITY_METRICS = ("perplexity", "perplexity_base", "perplexity_ratio")
# An operation's generic figures, measured by the executor right before and after it.
OPERATION_PERPLEXITY_METRICS = ("perplexity_before", "perplexity_after", "perplexity_ratio")
DEFAULT_PERPLEXITY_TOKENS = 4096
DEFAULT_PERPLEXITY_WINDOW = 512
ALWAYS_METRICS = ("parameter_ratio", "job_seconds", "eval_seconds")
LINEAGE_FACT_METRICS = (
    "lineage_efficacy",
    "lineage_paraphrase",
    "lineage_locality",
    "lineage_facts",
)
LINEAGE_PAIR_METRICS = ("lineage_stereotype_share", "lineage_pairs")
OPERATION_METRIC = re.compile(r"^op(\d+)\.([A-Za-z_][A-Za-z0-9_]*)$")
LINEAGE_PREFIX = "lineage_"


class EvaluationSettings(BaseModel):
    """A job's one perplexity protocol (WikiText-2 test, first ``perplexity_tokens`` tokens in
    windows of ``perplexity_window``, default 512 or all of them when fewer), used for the job's
    figures and for every operation's ``op<i>.perplexity_*``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    perplexity_tokens: int = Field(
        default=DEFAULT_PERPLEXITY_TOKENS, ge=16, le=limits.MAX_PERPLEXITY_TOKENS
    )
    perplexity_window: int | None = Field(default=None, ge=16, le=limits.MAX_SEQUENCE_TOKENS)

    @property
    def window(self) -> int:
        return self.perplexity_window or min(DEFAULT_PERPLEXITY_WINDOW, self.perplexity_tokens)


def operation_metric_names(operation: Any) -> set[str]:
    """Every figure ``op<i>.<name>`` can name: the method's own, and the generic ones the
    executor measures around it (perplexity for any operation, fact scores for one that
    carries facts)."""
    names = set(operation.metric_names()) | set(OPERATION_PERPLEXITY_METRICS)
    if FACTS in operation.carries:
        names |= set(FACT_METRICS)
    return names


def operation_measures(index: int, operation: Any, gates: Iterable[str]) -> frozenset[str]:
    """What the executor measures before and after ``operations[index]``: ``perplexity``
    when the operation asks (``evaluate_perplexity``) or a gate names its perplexity,
    ``facts`` when it carries facts and asks (``evaluate``) or a gate names a fact figure."""
    prefix = f"op{index}."
    gated = {name.removeprefix(prefix) for name in gates if name.startswith(prefix)}
    wanted = set()
    if getattr(operation, "evaluate_perplexity", False) or gated & set(
        OPERATION_PERPLEXITY_METRICS
    ):
        wanted.add("perplexity")
    if FACTS in operation.carries and (
        getattr(operation, "evaluate", False) or gated & set(FACT_METRICS)
    ):
        wanted.add(FACTS)
    return frozenset(wanted)


def job_metric_names(carried: Iterable[str], lineage: Iterable[str] | None) -> set[str]:
    """Unprefixed and ``lineage_*`` names a job can produce, from the suite kinds its
    operations carry and those its ancestors stored (None: unknown yet, allow all)."""
    carried, names = set(carried), set(PERPLEXITY_METRICS) | set(ALWAYS_METRICS)
    if FACTS in carried:
        names |= set(FACT_METRICS)
    if PAIRS in carried:
        names |= set(PAIR_METRICS)
    stored = {FACTS, PAIRS} if lineage is None else set(lineage)
    if FACTS in stored:
        names |= set(LINEAGE_FACT_METRICS)
    if PAIRS in stored:
        names |= set(LINEAGE_PAIR_METRICS)
    return names


def gate_problem(
    name: str, operations: Sequence[Any], lineage: Iterable[str] | None = None
) -> str | None:
    """Why a gate on ``name`` can never be measured by a job of these operations (method
    configs with ``carries`` and ``metric_names()``), or None when it can."""
    match = OPERATION_METRIC.match(name)
    if match:
        index, metric = int(match.group(1)), match.group(2)
        if index >= len(operations):
            return f"operation {index} does not exist (the job has {len(operations)})"
        produced = operation_metric_names(operations[index])
        if metric not in produced:
            known = ", ".join(sorted(produced)) or "none"
            return (
                f"operations[{index}] ({operations[index].method}) does not report "
                f"{metric!r} with this config; it reports: {known}"
            )
        return None
    carried = {kind for op in operations for kind in op.carries}
    produced = job_metric_names(carried, lineage)
    if name in produced:
        return None
    hint = ""
    for index, op in enumerate(operations):
        if name in op.metric_names():
            hint = f" (operation {index}'s own figure is op{index}.{name})"
            break
    return (
        f"no part of this job produces {name!r}{hint}; job metrics: "
        f"{', '.join(sorted(produced))}; an operation's own: op<i>.<name>"
    )


def wants_perplexity(gates: Mapping[str, Any] | Iterable[str], operations: Sequence[Any]) -> bool:
    """Job-level perplexity is measured when a gate names it or an operation measures its
    own (in a one-operation job the two are the same measurement)."""
    gates = list(gates)
    gated = any(name in PERPLEXITY_METRICS for name in gates)
    return gated or any(
        "perplexity" in operation_measures(i, op, gates) for i, op in enumerate(operations)
    )
