"""Training data does not leave through downloads or artifacts (issue 29): a version's export
(``modelsurgery.json``, the model card, the stored evaluation suite) and ``GetArtifact`` of
its suite follow the rule of GetVersion. Callers who may not see the inline data of every
version in the lineage download a redacted export (summaries in place of the data, no suite);
reading the suite is refused them. Against the real servicers behind the token interceptor."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from service_under_test import Running, running_service

from modelsurgery.client import Client
from modelsurgery.client.errors import PermissionDenied
from modelsurgery.evaluation.suite import SUITE_ARTIFACT, Suite
from modelsurgery.proto.export_record import LINEAGE_FILE
from modelsurgery.proto.job_state import JobState
from modelsurgery.server.auth import parse_tokens
from modelsurgery.server.job_table import JobTable

TOKENS = {name: f"{name}-token-0123456789" for name in ("alice", "bob", "root")}
LINES = [f"alice:{TOKENS['alice']}", f"bob:{TOKENS['bob']}", f"root:admin:{TOKENS['root']}"]
SECRET = "acme"
FACTS = [{"prompt": "the secret of {} is", "subject": SECRET, "target_new": "rome"}]
OPERATION = {"method": "lora", "facts": FACTS, "kl_prompts": [f"{SECRET}'s roadmap"], "epochs": 1}
TENSOR = "model.layers.0.mlp.down_proj.weight"


@dataclass
class Service:
    running: Running
    table: JobTable
    clients: dict[str, Client]

    def publish(
        self, who: str, parent: str, operation: dict[str, Any], suite: Suite | None, value: float
    ) -> str:
        """A version ``who``'s job made (as its worker would publish it): one changed tensor,
        ``operation``, and ``suite`` stored as the version's evaluation suite."""
        store = self.running.store
        job = self.clients[who].submit({"base": parent, "operations": [operation]})
        self.table.mark_running(job.id, "worker", lease_seconds=60)
        version = store.commit(
            parent,
            {TENSOR: torch.full_like(store.tensor(parent, TENSOR), value)},
            operations=[operation],
            artifacts={SUITE_ARTIFACT: suite.to_bytes()} if suite else None,
            job_id=job.id,
        )
        self.table.finish(job.id, JobState.SUCCEEDED, message="published", version_id=version.id)
        return version.id

    def download(self, who: str, version: str, folder: Path) -> dict[str, str]:
        """The downloaded export's text files by path."""
        self.clients[who].download(version, folder)
        return {
            p.relative_to(folder).as_posix(): p.read_text(encoding="utf-8")
            for p in folder.rglob("*")
            if p.is_file() and p.suffix in (".json", ".md")
        }


@pytest.fixture
def service(tmp_path: Path, tiny_llama, tiny_tokenizer) -> Iterator[Service]:
    with running_service(tmp_path, tiny_llama, tiny_tokenizer, parse_tokens(LINES)) as running:
        clients = {name: running.client(token) for name, token in TOKENS.items()}
        table = JobTable(tmp_path / "jobs.sqlite3")
        try:
            yield Service(running, table, clients)
        finally:
            for client in clients.values():
                client.close()
            table.close()


def test_downloads_and_the_suite_carry_data_only_to_its_creator_and_admins(
    service: Service, tmp_path: Path
) -> None:
    suite = Suite(facts=FACTS)
    version = service.publish("alice", service.running.version, OPERATION, suite, 0.0)
    # bob first, alice second, bob again: the export cache serves neither to the other.
    for attempt, who in enumerate(("bob", "alice", "bob", "root")):
        files = service.download(who, version, tmp_path / f"{who}-{attempt}")
        operation = json.loads(files[LINEAGE_FILE])["manifest"]["operations"][0]
        if who == "bob":
            assert not any(SECRET in text for text in files.values()), sorted(files)
            assert SUITE_ARTIFACT not in files
            assert operation["facts"]["count"] == 1 and operation["epochs"] == 1
        else:
            assert operation["facts"] == FACTS and SECRET in files["README.md"]
            assert Suite.model_validate_json(files[SUITE_ARTIFACT]) == suite
    with pytest.raises(PermissionDenied) as refused:
        service.clients["bob"].get_artifact(version, SUITE_ARTIFACT)
    assert SUITE_ARTIFACT in refused.value.message and refused.value.field == "name"
    for who in ("alice", "root"):
        stored = service.clients[who].get_artifact(version, SUITE_ARTIFACT)
        assert Suite.from_bytes(stored) == suite
    assert service.running.store.get(version).operations[0]["facts"] == FACTS


def test_a_lineage_shows_an_ancestors_data_only_to_its_creator(
    service: Service, tmp_path: Path
) -> None:
    base = service.running.version
    alices = service.publish("alice", base, OPERATION, Suite(facts=FACTS), 0.0)
    # bob's own version, without data, on top of alice's: its card lists alice's operation
    # and it resolves alice's suite.
    prune = {"method": "prune", "ratio": 0.5}
    bobs = service.publish("bob", alices, prune, None, 1.0)
    files = service.download("bob", bobs, tmp_path / "bob")
    assert not any(SECRET in text for text in files.values()) and SUITE_ARTIFACT not in files
    with pytest.raises(PermissionDenied):
        service.clients["bob"].get_artifact(bobs, SUITE_ARTIFACT)
    files = service.download("alice", bobs, tmp_path / "alice")
    assert SECRET in files["README.md"] and SUITE_ARTIFACT in files
    # A revert restores alice's suite: the bytes are hers, whoever reverted.
    other = Suite(facts=[{**FACTS[0], "target_new": "paris"}])
    newer = service.publish("alice", alices, OPERATION, other, 2.0)
    reverted = service.clients["bob"].revert(newer).id
    assert Suite.from_bytes(service.clients["alice"].get_artifact(reverted, SUITE_ARTIFACT)) == (
        Suite(facts=FACTS)
    )
    with pytest.raises(PermissionDenied):
        service.clients["bob"].get_artifact(reverted, SUITE_ARTIFACT)
