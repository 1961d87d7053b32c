"""A job's alias is authorised again when its version is published (issue 29): an alias
another caller created or took while the job waited is not moved; the version stays published
and the job SUCCEEDED, with an error saying the alias step failed and why."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import build_tiny_tokenizer, tiny_model

from modelsurgery.checkpoints import CheckpointStore, Manifest
from modelsurgery.proto.job_state import JobState
from modelsurgery.proto.spec import parse_spec
from modelsurgery.server.auth import Caller, Role
from modelsurgery.server.executor import execute_job
from modelsurgery.server.outcome import ALIAS_NOT_MOVED, settle_published
from modelsurgery.server.permissions import AliasPolicy, submitter

BOB = Caller("bob", Role.WRITER)


def test_a_queued_job_does_not_move_an_alias_created_meanwhile(job_env: dict[str, Any]) -> None:
    """Bob's alias was new when he submitted; Alice created it before his job published."""
    store: CheckpointStore = job_env["store"]
    base = store.import_model(tiny_model("llama"), build_tiny_tokenizer(), reference="other")
    store.set_alias("team-prod", base.id, owner="alice")
    outcome = execute_job(
        {
            "base": str(job_env["folder"]),
            "operations": [{"method": "mask_heads", "heads": ["0.1"]}],
            "alias": "team-prod",
        },
        store=store,
        cache=job_env["cache"],
        settings=job_env["settings"],
        emit=lambda event: None,
        is_cancelled=lambda: False,
        caller=BOB,
    )
    assert outcome.state == JobState.SUCCEEDED and store.get(outcome.version_id)
    assert store.get_alias("team-prod") == base.id
    assert outcome.error.startswith(ALIAS_NOT_MOVED) and "belongs to another caller" in (
        outcome.error
    )


def published(store: CheckpointStore) -> Manifest:
    """A version (child of a root) as a job leaves it just before it settles."""
    root = store.import_model(tiny_model("llama"), build_tiny_tokenizer(), reference="tiny")
    name = "model.layers.0.self_attn.o_proj.weight"
    return store.commit(
        root.id,
        {name: torch.zeros_like(store.tensor(root.id, name))},
        operations=[{"method": "mask_heads"}],
    )


@pytest.mark.parametrize(
    ("caller", "shared", "moved"),
    [
        (BOB, (), False),
        (Caller("root", Role.ADMIN), (), True),
        (BOB, ("team-*",), True),
        (Caller("alice", Role.WRITER), (), True),
    ],
)
def test_publish_moves_an_alias_its_submitter_may_move(
    store: CheckpointStore, caller: Caller, shared: tuple[str, ...], moved: bool
) -> None:
    version = published(store)
    parent = version.parent
    assert parent is not None
    store.set_alias("team-prod", parent, owner="alice")
    spec = parse_spec(
        {
            "base": "tiny",
            "operations": [{"method": "mask_heads", "heads": ["0.1"]}],
            "alias": "team-prod",
        }
    )
    outcome = settle_published(spec, version, store, caller, AliasPolicy(shared))
    assert outcome.state == JobState.SUCCEEDED and outcome.version_id == version.id
    assert store.get_alias("team-prod") == (version.id if moved else parent)
    assert bool(outcome.error) is not moved
    assert store.alias_owner("team-prod") == "alice"


def test_a_new_alias_is_owned_by_the_submitter(store: CheckpointStore) -> None:
    version = published(store)
    spec = parse_spec(
        {
            "base": "tiny",
            "operations": [{"method": "mask_heads", "heads": ["0.1"]}],
            "alias": "bob-prod",
        }
    )
    assert not settle_published(spec, version, store, BOB, AliasPolicy()).error
    assert (store.get_alias("bob-prod"), store.alias_owner("bob-prod")) == (version.id, "bob")


def test_a_job_row_without_a_role_publishes_as_a_writer() -> None:
    assert submitter("bob", "") == BOB
    assert submitter("root", "admin") == Caller("root", Role.ADMIN)
