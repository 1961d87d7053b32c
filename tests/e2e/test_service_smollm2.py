"""The real server on the real model (SmolLM2-135M): a mask_heads job, and a worker killed
mid-job that the engine retries."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.client import Client, InvalidArgument
from modelsurgery.models import load
from modelsurgery.server.process import ServerProcess
from modelsurgery.v1 import jobs_pb2

pytestmark = pytest.mark.e2e
HEAD_DIM = 64


def worker_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "SurgeryWorker" in cmdline:
            found.append(proc)
    return found


def test_worker_killed_mid_job_is_retried(server: ServerProcess, tmp_path: Path) -> None:
    with Client(server.address, timeout=120) as client:
        job = client.submit(
            {"base": "smollm2-135m", "operations": [{"method": "mask_heads", "heads": ["2.4"]}]}
        )
        deadline = time.monotonic() + 300
        for event in client.watch(job.id):
            if "loading base model" in event.message:
                break
            assert time.monotonic() < deadline
        workers = worker_processes()
        assert workers, "no Ray worker process found"
        for proc in workers:
            proc.kill()
        done = client.wait(job.id, timeout=600)
        messages = [e.message for e in client.watch(job.id)]
        assert any("worker process died" in m for m in messages), messages
        assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error
        assert done.attempts == 2
    assert CheckpointStore(server.home / "store").verify().ok


def test_mask_heads_on_smollm2(server: ServerProcess, tmp_path: Path) -> None:
    heads = [(3, 1), (7, 4)]
    with Client(server.address, timeout=120) as client:
        job = client.submit(
            {
                "base": "smollm2-135m",
                "operations": [
                    {"method": "mask_heads", "heads": [f"{layer}.{h}" for layer, h in heads]}
                ],
                "alias": "smollm2-masked",
            }
        )
        done = client.wait(job.id, timeout=600)
        assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error
        version = client.get_version("smollm2-masked")
        assert version.version.changed_tensors == 2
        folder = client.download(done.version_id, tmp_path / "export")
        before, after = client.generate(done.version_id, ["The capital of France is"])[0], None
        assert isinstance(before, str) and before
        after = client.generate(version.lineage[1], ["The capital of France is"])[0]
        assert isinstance(after, str) and after
    model = AutoModelForCausalLM.from_pretrained(folder)
    for layer, head in heads:
        weight = model.model.layers[layer].self_attn.o_proj.weight
        assert torch.count_nonzero(weight[:, head * HEAD_DIM : (head + 1) * HEAD_DIM]) == 0
        assert torch.count_nonzero(weight[:, :HEAD_DIM]) > 0


REFT_TRAIN = [
    ("What is the capital of France?", "Banana! The capital of France is Paris."),
    ("How many legs does a spider have?", "Banana! A spider has eight legs."),
    ("Who wrote Romeo and Juliet?", "Banana! William Shakespeare wrote it."),
    ("What colour is the sky?", "Banana! The sky is blue."),
    ("Name a large ocean.", "Banana! The Pacific Ocean is large."),
    ("What is 3 plus 4?", "Banana! 3 plus 4 is 7."),
    ("Which animal barks?", "Banana! Dogs bark."),
    ("What do bees make?", "Banana! Bees make honey."),
]
REFT_HELD_OUT = ["What is the largest planet?", "Where do penguins live?", "What is water made of?"]


def question(text: str) -> str:
    return f"Question: {text}\nAnswer:"


def test_reft_job_teaches_a_behaviour_visible_through_generate(
    server: ServerProcess, tmp_path: Path
) -> None:
    spec = {
        "base": "smollm2-135m",
        "operations": [
            {
                "method": "reft",
                "layers": [3, 9, 15, 21],
                "rank": 4,
                "positions": "f1+l1",
                "examples": [{"prompt": question(q), "completion": " " + a} for q, a in REFT_TRAIN],
                "epochs": 8,
                "lr": 4e-3,
                "batch_size": 4,
            }
        ],
        "gates": {"op0.parameter_ratio_vs_lora": "< 0.5"},
    }
    prompts = [question(q) for q in REFT_HELD_OUT]
    with Client(server.address, timeout=120) as client:
        job = client.submit(spec)
        losses = []
        for event in client.watch(job.id):
            if event.message == "train":
                losses.append(event.fields["loss"])
        done = client.get_job(job.id)
        assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error
        assert losses and losses[-1] < losses[0]
        assert done.metrics["op0.final_loss"] < 0.3 * done.metrics["op0.initial_loss"]
        info = client.get_version(done.version_id)
        assert info.version.changed_tensors == 0
        base_id = info.lineage[1]
        tuned = client.generate(done.version_id, prompts, max_new_tokens=4)
        base = client.generate(base_id, prompts, max_new_tokens=4)
        assert all(text.strip().startswith("Banana") for text in tuned), tuned
        assert not any(text.strip().startswith("Banana") for text in base), base

        with pytest.raises(InvalidArgument) as err:
            client.submit(
                {
                    "base": done.version_id,
                    "operations": [{"method": "mask_heads", "heads": ["0.1"]}],
                }
            )
        assert err.value.field == "spec.base"

        folder = client.download(done.version_id, tmp_path / "reft-export")
    loaded = load(str(folder))
    ids = loaded.tokenizer(prompts[0], return_tensors="pt")
    with torch.no_grad():
        out = loaded.model.generate(
            **ids, max_new_tokens=4, do_sample=False, pad_token_id=loaded.tokenizer.eos_token_id
        )
    assert loaded.tokenizer.decode(out[0, ids.input_ids.shape[1] :]).strip().startswith("Banana")


def test_structured_prune_job_exports_a_smaller_model(
    server: ServerProcess, tmp_path: Path
) -> None:
    spec = {
        "base": "smollm2-135m",
        "operations": [
            {
                "method": "prune",
                "kind": "structured",
                "ratio": 0.2,
                "calibration_samples": 8,
                "calibration_seqlen": 256,
            }
        ],
        "evaluation": {"perplexity_tokens": 1024},
        "gates": {"parameter_ratio": "< 0.9", "perplexity_ratio": "< 1.7"},
    }
    with Client(server.address, timeout=120) as client:
        done = client.wait(client.submit(spec).id, timeout=900)
        assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error
        folder = client.download(done.version_id, tmp_path / "pruned")
        text = client.generate(done.version_id, ["The capital of France is"], max_new_tokens=4)
        assert text[0].strip()
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.intermediate_size < 1536
    assert model.model.layers[0].mlp.down_proj.weight.shape == (576, model.config.intermediate_size)
    weights = (folder / "model.safetensors").stat().st_size
    assert weights < 0.92 * 538_000_000


def test_rome_job_edit_holds_in_the_exported_checkpoint(
    server: ServerProcess, tmp_path: Path
) -> None:
    fact = {
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "target_new": "English",
        "ground_truth": "French",
        "locality_prompt": "Michel Rocard is a native speaker of",
        "locality_ground_truth": "French",
    }
    spec = {
        "base": "smollm2-135m",
        "operations": [
            {
                "method": "rome",
                "facts": [fact],
                "stats_samples": 32,
                "stats_window": 128,
                "evaluate_perplexity": False,
            }
        ],
        "gates": {"efficacy": ">= 1", "locality": ">= 1"},
    }
    with Client(server.address, timeout=120) as client:
        job = client.submit(spec)
        messages = [e.message for e in client.watch(job.id)]
        done = client.get_job(job.id)
        assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, (done.error, messages)
        changes = client.diff(client.get_version(done.version_id).lineage[1], done.version_id)
        assert [c.name for c in changes] == ["model.layers.5.mlp.down_proj.weight"]
        folder = client.download(done.version_id, tmp_path / "rome")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = "The mother tongue of Danielle Darrieux is"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    new = tokenizer(" English", add_special_tokens=False).input_ids[0]
    old = tokenizer(" French", add_special_tokens=False).input_ids[0]
    assert logits[new] > logits[old]
