"""Which jobs may build on a ReFT version.

Rule: a ReFT version is a leaf.
- Its interventions were trained on the hidden states of its exact base weights. A later weight
  edit (rome, memit, mask_heads, prune) changes those hidden states and silently invalidates
  them, and a second ReFT on top would need the first one's hooks live during training and a
  stacked artifact format. So no job may use a ReFT version as its base.
- Inside one job, ``reft`` must be the last operation and appear at most once: weight edits
  first, then ReFT trained on the edited weights (``[rome, reft]`` is fine, ``[reft, rome]``
  is not).
To combine, edit the weights first and run ReFT on that version (or retrain ReFT in one job).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from modelsurgery.editing.reft.artifacts import CONFIG_ARTIFACT

REFT_METHOD = "reft"


def is_reft_version(artifacts_or_manifest: Mapping[str, Any]) -> bool:
    """True for a version's artifacts (``{name: bytes}``) or manifest (a dict with
    ``operations`` whose entries name ``method`` directly or under ``config``, and/or an
    ``artifacts`` listing) that carries ReFT interventions."""
    if CONFIG_ARTIFACT in artifacts_or_manifest:
        return True
    listed = artifacts_or_manifest.get("artifacts")
    if isinstance(listed, Mapping | list | tuple | set) and CONFIG_ARTIFACT in listed:
        return True
    operations = artifacts_or_manifest.get("operations")
    if isinstance(operations, list | tuple):
        return any(_operation_method(op) == REFT_METHOD for op in operations)
    return False


def combination_error(base_is_reft: bool, operation_methods: Sequence[str]) -> str | None:
    """Why a job's operations cannot run on its base (message starts with the field path),
    or None when the combination is allowed."""
    if base_is_reft:
        return (
            "base: a ReFT version cannot be the base of another job (its interventions are "
            "tied to its exact weights); edit the weights first, then run reft last"
        )
    reft_at = [i for i, method in enumerate(operation_methods) if method == REFT_METHOD]
    if len(reft_at) > 1:
        return f"operations[{reft_at[1]}]: at most one reft operation per job"
    if reft_at and reft_at[0] != len(operation_methods) - 1:
        return (
            f"operations[{reft_at[0] + 1}]: no operation may follow reft "
            "(a weight edit would invalidate the trained interventions)"
        )
    return None


def _operation_method(operation: Any) -> str | None:
    if isinstance(operation, str):
        return operation
    if isinstance(operation, Mapping):
        if isinstance(operation.get("method"), str):
            return operation["method"]
        config = operation.get("config")
        if isinstance(config, Mapping) and isinstance(config.get("method"), str):
            return config["method"]
    return None
