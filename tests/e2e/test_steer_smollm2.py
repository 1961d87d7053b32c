"""steer on the real server and model: the baked version is plain weights (its download, loaded
with plain transformers, continues text as the server's Generate does); the hook version is a
leaf whose download continues text the same way through ``modelsurgery.models.load``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import greedy_text
from transformers import AutoModelForCausalLM, AutoTokenizer

from modelsurgery.client import Client, InvalidArgument
from modelsurgery.models import load
from modelsurgery.server.process import ServerProcess
from modelsurgery.v1 import jobs_pb2

pytestmark = pytest.mark.e2e
PAIRS_FILE = Path(__file__).parents[2] / "benchmarks" / "data" / "sentiment_pairs.jsonl"
PROMPTS = ["The meeting was scheduled for", "The train to the coast"]
NEW_TOKENS = 12


def steer_spec(**extra: object) -> dict:
    pairs = [json.loads(line) for line in PAIRS_FILE.read_text().splitlines() if line.strip()]
    operation = {"method": "steer", "pairs": pairs, "layers": [8], "coefficient": 1.0}
    return {
        "base": "smollm2-135m",
        "operations": [{**operation, "evaluate_perplexity": False, **extra}],
    }


def greedy(model: torch.nn.Module, tokenizer, prompt: str) -> str:
    return greedy_text(model, tokenizer, prompt, NEW_TOKENS)


def test_baked_and_hooked_steering_match_their_downloads(
    server: ServerProcess, tmp_path: Path
) -> None:
    with Client(server.address, timeout=120) as client:
        baked = client.wait(client.submit(steer_spec()).id, timeout=600)
        hooked = client.wait(client.submit(steer_spec(bake=False)).id, timeout=600)
        assert baked.state == jobs_pb2.JOB_STATE_SUCCEEDED, baked.error
        assert hooked.state == jobs_pb2.JOB_STATE_SUCCEEDED, hooked.error
        assert baked.metrics["op0.baked"] == 1.0 and hooked.metrics["op0.baked"] == 0.0
        assert client.get_version(hooked.version_id).version.changed_tensors == 0
        base_id = client.get_version(baked.version_id).lineage[1]
        base_text = client.generate(base_id, PROMPTS, max_new_tokens=NEW_TOKENS)
        baked_text = client.generate(baked.version_id, PROMPTS, max_new_tokens=NEW_TOKENS)
        hooked_text = client.generate(hooked.version_id, PROMPTS, max_new_tokens=NEW_TOKENS)
        assert baked_text != base_text
        assert hooked_text == baked_text

        with pytest.raises(InvalidArgument) as err:
            client.submit(
                {
                    "base": hooked.version_id,
                    "operations": [{"method": "mask_heads", "heads": ["0.1"]}],
                }
            )
        assert err.value.field == "spec.base"
        chained = client.submit(
            {"base": baked.version_id, "operations": [{"method": "mask_heads", "heads": ["0.1"]}]}
        )
        assert client.wait(chained.id, timeout=600).state == jobs_pb2.JOB_STATE_SUCCEEDED

        baked_folder = client.download(baked.version_id, tmp_path / "baked")
        hooked_folder = client.download(hooked.version_id, tmp_path / "hooked")
    plain = AutoModelForCausalLM.from_pretrained(baked_folder).eval()
    assert plain.config.mlp_bias is True
    tokenizer = AutoTokenizer.from_pretrained(baked_folder)
    assert [greedy(plain, tokenizer, p) for p in PROMPTS] == baked_text
    loaded = load(str(hooked_folder))
    assert loaded.hooks is not None and loaded.hooks.methods == ["steer"]
    assert [greedy(loaded.model, loaded.tokenizer, p) for p in PROMPTS] == hooked_text
