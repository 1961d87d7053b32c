"""The suites a version's lineage stored: each version's own ``evaluation/suite.json``."""

from __future__ import annotations

from modelsurgery.checkpoints import CheckpointStore

from .metrics import FACTS, PAIRS
from .suite import SUITE_ARTIFACT, Suite


def own_suite(store: CheckpointStore, version_id: str) -> Suite | None:
    """The suite this version stored itself (not one inherited from an ancestor)."""
    if SUITE_ARTIFACT not in store.get(version_id).artifacts:
        return None
    return Suite.from_bytes(store.read_file(version_id, SUITE_ARTIFACT))


def lineage_suites(store: CheckpointStore, version_id: str) -> list[Suite]:
    """Suites of ``version_id`` and every ancestor back to the root, newest first."""
    suites = (own_suite(store, m.id) for m in store.lineage(version_id))
    return [s for s in suites if s is not None]


def stored_kinds(suites: list[Suite]) -> set[str]:
    """Which suite kinds (facts, pairs) a lineage can be re-checked on."""
    kinds = set()
    if any(s.facts for s in suites):
        kinds.add(FACTS)
    if any(s.pairs for s in suites):
        kinds.add(PAIRS)
    return kinds
