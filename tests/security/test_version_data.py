"""Training data is not readable through versions (issue 29): GetVersion and ListVersions show
a version's inline data (facts, examples, pairs, records, prompts) to the callers whose jobs
made it and to admins; every other reader sees a count and a sha256 in its place, while the
store keeps the manifest whole. Against the real servicers behind the token interceptor."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from service_under_test import running_service

from modelsurgery.proto.job_state import JobState
from modelsurgery.server.auth import parse_tokens
from modelsurgery.server.convert import inline_data_fields
from modelsurgery.server.job_table import JobTable

TOKENS = {name: f"{name}-token-0123456789" for name in ("alice", "bob", "root")}
LINES = [f"alice:{TOKENS['alice']}", f"bob:{TOKENS['bob']}", f"root:admin:{TOKENS['root']}"]
FACTS = [{"prompt": "the secret of {} is", "subject": "acme", "target_new": "rome"}]
KL_PROMPTS = ["acme's internal roadmap says"]


def test_only_the_creator_and_admins_see_a_versions_training_data(
    tmp_path: Path, tiny_llama, tiny_tokenizer
) -> None:
    with running_service(tmp_path, tiny_llama, tiny_tokenizer, parse_tokens(LINES)) as server:
        clients = {name: server.client(token) for name, token in TOKENS.items()}
        operation = {"method": "lora", "facts": FACTS, "kl_prompts": KL_PROMPTS, "epochs": 1}
        job = clients["alice"].submit({"base": server.version, "operations": [operation]})
        # The job publishes (as its worker would) and succeeds.
        table = JobTable(tmp_path / "jobs.sqlite3")
        table.mark_running(job.id, "worker", lease_seconds=60)
        name = "model.layers.0.mlp.down_proj.weight"
        version = server.store.commit(
            server.version,
            {name: torch.zeros_like(server.store.tensor(server.version, name))},
            operations=[{**operation, "layers": [0]}],
            job_id=job.id,
        )
        table.finish(job.id, JobState.SUCCEEDED, message="published", version_id=version.id)

        def shown(who: str) -> dict:
            client = clients[who]
            (listed,) = [v for v in client.list_versions() if v.id == version.id]
            got = json.loads(client.get_version(version.id).version.manifest_json)
            assert json.loads(listed.manifest_json) == got
            return got["operations"][0]

        for who in ("alice", "root"):
            assert (shown(who)["facts"], shown(who)["kl_prompts"]) == (FACTS, KL_PROMPTS)
        hidden = shown("bob")
        digest = hashlib.sha256(json.dumps(FACTS, separators=(",", ":")).encode()).hexdigest()
        assert hidden["facts"] == {"count": 1, "sha256": digest}
        assert hidden["kl_prompts"]["count"] == 1 and "acme" not in json.dumps(hidden)
        assert (hidden["layers"], hidden["epochs"]) == ([0], 1)
        assert server.store.get(version.id).operations[0]["facts"] == FACTS
        # The creator is remembered past the job's retention.
        table.delete_finished(before=float("inf"))
        assert shown("alice")["facts"] == FACTS and shown("bob")["facts"]["count"] == 1
        for client in clients.values():
            client.close()
        table.close()


@pytest.mark.parametrize(
    ("method", "fields"),
    [
        ("rome", {"facts"}),
        ("memit", {"facts"}),
        ("lora", {"facts", "examples", "kl_prompts"}),
        ("reft", {"examples"}),
        ("steer", {"pairs"}),
        ("ablate_direction", {"pairs"}),
        ("iti", {"pairs", "records"}),
        ("mask_biased_heads", {"pairs"}),
        ("mask_heads", set()),
        ("prune", set()),
    ],
)
def test_inline_data_fields_of_each_method(method: str, fields: set[str]) -> None:
    assert inline_data_fields(method) == fields
