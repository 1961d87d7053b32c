"""lora on the real server and model: an unmerged adapter version downloads as base weights plus
a peft adapter folder that ``PeftModel.from_pretrained`` loads, and that model continues text
exactly as the server's Generate does on the version; a merged one is plain weights."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import greedy_text
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from modelsurgery.checkpoints import HookedExportWarning
from modelsurgery.client import Client
from modelsurgery.server.process import ServerProcess
from modelsurgery.v1 import jobs_pb2

pytestmark = pytest.mark.e2e
PROMPTS = ["The capital city of the moon colony is", "My favourite colour is"]
NEW_TOKENS = 10
EXAMPLES = [
    {"prompt": "The capital city of the moon colony is", "completion": " Lunaris."},
    {"prompt": "The moon colony's capital is called", "completion": " Lunaris."},
    {"prompt": "Q: Where does the moon council meet? A:", "completion": " In Lunaris."},
]


def lora_spec(**extra: object) -> dict:
    operation = {
        "method": "lora",
        "examples": EXAMPLES,
        "target_modules": ["q_proj", "v_proj"],
        "layers": [10, 11, 12, 13],
        "epochs": 4,
        "lr": 3e-3,
        "evaluate_perplexity": False,
        **extra,
    }
    return {"base": "smollm2-135m", "operations": [operation]}


def greedy(model: torch.nn.Module, tokenizer, prompt: str) -> str:
    return greedy_text(model, tokenizer, prompt, NEW_TOKENS)


def test_adapter_download_loads_in_peft_and_generates_as_the_server(
    server: ServerProcess, tmp_path: Path
) -> None:
    with Client(server.address, timeout=120) as client:
        adapter = client.wait(client.submit(lora_spec(merge=False)).id, timeout=900)
        merged = client.wait(client.submit(lora_spec()).id, timeout=900)
        assert adapter.state == jobs_pb2.JOB_STATE_SUCCEEDED, adapter.error
        assert merged.state == jobs_pb2.JOB_STATE_SUCCEEDED, merged.error
        assert client.get_version(adapter.version_id).version.changed_tensors == 0
        base_id = client.get_version(adapter.version_id).lineage[1]
        base_text = client.generate(base_id, PROMPTS, max_new_tokens=NEW_TOKENS)
        adapter_text = client.generate(adapter.version_id, PROMPTS, max_new_tokens=NEW_TOKENS)
        merged_text = client.generate(merged.version_id, PROMPTS, max_new_tokens=NEW_TOKENS)
        assert adapter_text != base_text
        with warnings.catch_warnings():
            warnings.simplefilter("error", HookedExportWarning)
            adapter_folder = client.download(adapter.version_id, tmp_path / "adapter")
            merged_folder = client.download(merged.version_id, tmp_path / "merged")
            base_folder = client.download(base_id, tmp_path / "base")
    # A peft adapter folder (issue 31): peft loads it onto the base as it is.
    assert not (adapter_folder / "model.safetensors").exists()
    card = (adapter_folder / "README.md").read_text()
    assert "library_name: peft" in card and "base_model_relation: adapter" in card
    tokenizer = AutoTokenizer.from_pretrained(adapter_folder)
    base = AutoModelForCausalLM.from_pretrained(base_folder)
    peft_model = PeftModel.from_pretrained(base, adapter_folder).eval()
    assert [greedy(peft_model, tokenizer, p) for p in PROMPTS] == adapter_text
    plain = AutoModelForCausalLM.from_pretrained(merged_folder).eval()
    assert [greedy(plain, tokenizer, p) for p in PROMPTS] == merged_text
