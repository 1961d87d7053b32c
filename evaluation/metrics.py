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
from collections.abc import Iterable, Sequence
from typing import Any

FACTS = "facts"
PAIRS = "pairs"

FACT_METRICS = ("efficacy", "paraphrase", "locality", "probability_gain")
PAIR_METRICS = ("stereotype_share", "stereotype_share_base", "bias_gap", "bias_gap_base")
PERPLEXITY_METRICS = ("perplexity", "perplexity_base", "perplexity_ratio")
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
        produced = operations[index].metric_names()
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


def wants_perplexity(gates: Iterable[str], operations: Sequence[Any]) -> bool:
    """Job-level perplexity is measured when a gate names it or an operation asked for it."""
    gated = any(name in PERPLEXITY_METRICS for name in gates)
    return gated or any(getattr(op, "evaluate_perplexity", False) for op in operations)
