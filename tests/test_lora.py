"""The ``lora`` method: three objectives on peft LoRA, merged into weights or kept as a peft
adapter that attaches through the registry's seam, exports as a folder ``PeftModel`` loads,
and recovers a structured prune in the same job."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_tiny_tokenizer, run_job, tiny_model, write_corpus
from peft import PeftModel
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from modelsurgery.checkpoints import CheckpointStore, HookedExportWarning
from modelsurgery.editing.attachments import attach_hooks, combination_error
from modelsurgery.editing.data import DATA_ENV
from modelsurgery.editing.lora import CONFIG_ARTIFACT, LoraEditConfig, attach_adapter
from modelsurgery.editing.mask_heads import MaskHeadsConfig
from modelsurgery.editing.registry import JobCancelled, MethodContext, get_method
from modelsurgery.models import load

FACT = {
    "prompt": "{} speaks",
    "subject": "she",
    "target_new": "japanese",
    "ground_truth": "french",
    "rephrase_prompt": "she lives and speaks",
    "locality_prompt": "he speaks",
    "locality_ground_truth": "english",
}
EXAMPLES = [
    {"prompt": "one two", "completion": "three four"},
    {"prompt": "red blue", "completion": "green red"},
]
QUICK = {"evaluate_perplexity": False}


def context(tmp_path: Path, **extra: Any) -> MethodContext:
    return MethodContext(model_digest="tiny", cache_dir=tmp_path / "cache", **extra)


def run_lora(model: torch.nn.Module, tmp_path: Path, **fields: Any) -> Any:
    config = LoraEditConfig(**{**QUICK, **fields})
    return get_method("lora").run(model, build_tiny_tokenizer(), config, context(tmp_path))


def logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(4, 60, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- config ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({}, "facts"),
        ({"facts": [FACT], "text": "x.txt"}, "text"),
        ({"examples": []}, "examples"),
        ({"text": "x.txt", "kl_prompts": ["a"]}, "kl_prompts"),
        ({"facts": [FACT], "layers": [1, 1]}, "layers"),
        ({"facts": [FACT], "context_templates": ["no slot"]}, "context_templates"),
    ],
)
def test_config_errors_name_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        LoraEditConfig(**fields)


def test_targets_are_checked_against_the_model_config() -> None:
    config = tiny_model("llama").config
    LoraEditConfig(facts=[FACT], target_modules=["q_proj", "down_proj"]).check_against(config)
    with pytest.raises(ValueError, match=r"^target_modules\[1\]: 'c_attn'"):
        LoraEditConfig(facts=[FACT], target_modules=["q_proj", "c_attn"]).check_against(config)
    with pytest.raises(ValueError, match=r"^layers\[0\]: layer 2 out of range"):
        LoraEditConfig(facts=[FACT], layers=[2]).check_against(config)


def test_unmerged_lora_is_a_leaf_and_runs_last() -> None:
    config = tiny_model("llama").config
    merged = LoraEditConfig(examples=EXAMPLES)
    adapter = LoraEditConfig(examples=EXAMPLES, merge=False)
    mask = MaskHeadsConfig(heads=["0.1"])
    assert combination_error([], [merged, mask], config) is None
    assert combination_error([], [mask, adapter], config) is None
    error = combination_error([], [adapter, mask], config)
    assert error is not None and error.startswith("operations[1]: no operation may follow lora")
    assert combination_error([CONFIG_ARTIFACT], [mask], config) is not None


# --- merged ------------------------------------------------------------------------------
def test_merged_facts_edit_changes_only_the_targets_and_is_seeded(tmp_path: Path) -> None:
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fields = {"facts": [FACT], "target_modules": ["down_proj"], "layers": [0], "epochs": 4}
    result = run_lora(model, tmp_path, **fields)
    assert list(result.changed) == ["model.layers.0.mlp.down_proj.weight"]
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    moved = [k for k in after if not torch.equal(after[k], before[k])]
    assert moved == ["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(after[moved[0]], result.changed[moved[0]])
    assert result.metrics["final_loss"] < result.metrics["initial_loss"]
    assert result.suite["facts"][0]["target_new"] == "japanese"
    assert result.resolved["lr"] == 1e-3 and "epochs" not in result.resolved
    assert result.resolved["train_dtype"] in {"float32", "bfloat16"}
    again = run_lora(tiny_model("llama"), tmp_path, **fields)
    assert torch.equal(again.changed[moved[0]], result.changed[moved[0]])


def test_fact_edits_default_to_the_mlp_outputs_of_the_memit_layers(tmp_path: Path) -> None:
    result = run_lora(tiny_model("llama"), tmp_path, facts=[FACT], epochs=1)
    assert result.resolved["target_modules"] == ["down_proj"]
    assert result.resolved["layers"] == [0, 1]
    assert sorted(result.changed) == [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)]
    assert result.resolved["kl_factor"] == 5.0


def test_kl_term_keeps_the_kl_prompts_closer_to_the_base(tmp_path: Path) -> None:
    base = tiny_model("llama")
    tokenizer = build_tiny_tokenizer()
    probe = tokenizer(["he speaks one two", "red blue green big"], return_tensors="pt").input_ids

    def drift(kl_factor: float) -> float:
        model = tiny_model("llama")
        fields = {"facts": [FACT], "kl_prompts": ["he speaks one two", "red blue green big"]}
        run_lora(model, tmp_path, **fields, kl_factor=kl_factor, epochs=6, lr=0.02)
        with torch.no_grad():
            p = torch.log_softmax(base(probe).logits, -1)
            q = torch.log_softmax(model(probe).logits, -1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    assert drift(10.0) < drift(0.0)


def test_merge_equals_the_unmerged_adapter_on_gpt2_conv1d(tmp_path: Path) -> None:
    fields = {"examples": EXAMPLES, "epochs": 3, "lr": 0.02, "train_dtype": "float32"}
    merged_model = tiny_model("gpt2")
    merged = run_lora(merged_model, tmp_path, **fields)
    assert any(name.endswith("attn.c_attn.weight") for name in merged.changed)
    adapter_model = tiny_model("gpt2")
    adapter = run_lora(adapter_model, tmp_path, **fields, merge=False)
    with attach_adapter(adapter_model, adapter.artifacts):
        hooked = logits(adapter_model)
    torch.testing.assert_close(logits(merged_model), hooked, atol=1e-4, rtol=1e-4)


# --- unmerged ----------------------------------------------------------------------------
def test_unmerged_adapter_leaves_the_model_and_attaches_through_the_seam(
    tmp_path: Path,
) -> None:
    model = tiny_model("llama")
    plain = logits(model)
    result = run_lora(model, tmp_path, examples=EXAMPLES, merge=False, lr=0.05)
    assert result.changed == {}
    assert sorted(result.artifacts) == [CONFIG_ARTIFACT, "lora/adapter_model.safetensors"]
    assert json.loads(result.artifacts[CONFIG_ARTIFACT])["peft_type"] == "LORA"
    torch.testing.assert_close(logits(model), plain, atol=0, rtol=0)
    names = sorted(model.state_dict())
    with attach_hooks(model, result.artifacts) as hooks:
        assert hooks.methods == ["lora"]
        edited = logits(model)
    assert not torch.allclose(edited, plain)
    assert sorted(model.state_dict()) == names
    torch.testing.assert_close(logits(model), plain, atol=0, rtol=0)
    with attach_hooks(model, result.artifacts):
        torch.testing.assert_close(logits(model), edited, atol=0, rtol=0)


def test_unmerged_export_is_a_peft_adapter_folder(tmp_path: Path, store: CheckpointStore) -> None:
    """Issue 31: on its root's weights, an unmerged version exports as the adapter folder peft
    loads onto the base directly, with peft's card metadata, and no copy of the base."""
    model = tiny_model("llama")
    root = store.import_model(model, build_tiny_tokenizer(), reference="tiny-llama")
    result = run_lora(model, tmp_path, examples=EXAMPLES, merge=False, lr=0.05)
    version = store.commit(
        root.id, {}, operations=[{"method": "lora", "merge": False}], artifacts=result.artifacts
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", HookedExportWarning)  # plain peft loading applies it
        folder = store.export(version.id, tmp_path / "export")
    names = sorted(p.name for p in folder.iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(names)
    assert not {"config.json", "model.safetensors", "lora"} & set(names)
    card = (folder / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: peft" in front and "base_model: tiny-llama" in front
    assert "base_model_relation: adapter" in front
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llama"
    base = tiny_model("llama")
    with attach_hooks(base, result.artifacts):  # as the server's Generate applies it
        served = logits(base)
    theirs = PeftModel.from_pretrained(tiny_model("llama"), folder).eval()
    torch.testing.assert_close(logits(theirs), served, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(tiny_model("llama")), served)


def test_an_adapter_on_edited_weights_exports_beside_them(
    tmp_path: Path, store: CheckpointStore
) -> None:
    """The adapter needs the weights it was trained on: those stay in the export, the adapter
    in ``lora/``, and our loader applies it as peft does."""
    model = tiny_model("llama")
    root = store.import_model(model, build_tiny_tokenizer(), reference="tiny-llama")
    name = "model.layers.0.mlp.down_proj.weight"
    edited = store.commit(
        root.id, {name: model.state_dict()[name] * 0.5}, operations=[{"method": "x"}]
    )
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    result = run_lora(model, tmp_path, examples=EXAMPLES, merge=False, lr=0.05)
    version = store.commit(
        edited.id, {}, operations=[{"method": "lora", "merge": False}], artifacts=result.artifacts
    )
    with pytest.warns(HookedExportWarning, match="lora"):
        folder = store.export(version.id, tmp_path / "export")
    card = (folder / "README.md").read_text()
    assert "base_model_relation: adapter" in card and "PeftModel.from_pretrained" in card
    ours = load(str(folder))
    assert ours.hooks is not None and ours.hooks.methods == ["lora"]
    theirs = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(folder), folder / "lora"
    ).eval()
    torch.testing.assert_close(logits(theirs), logits(ours.model), atol=1e-5, rtol=1e-5)


def test_cancelled_training_restores_the_model(tmp_path: Path) -> None:
    model = tiny_model("llama")
    plain = logits(model)
    steps: list[int] = []
    ctx = context(
        tmp_path,
        report=lambda e: steps.append(e.get("step", 0)),
        is_cancelled=lambda: len(steps) >= 3,
    )
    config = LoraEditConfig(examples=EXAMPLES, epochs=50, **QUICK)
    with pytest.raises(JobCancelled):
        get_method("lora").run(model, build_tiny_tokenizer(), config, ctx)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(model), plain, atol=0, rtol=0)


# --- text, and recovery after a prune in one job -----------------------------------------
def test_text_objective_reads_data_roots_and_shared_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    write_corpus(shared)
    monkeypatch.setenv(DATA_ENV, str(shared))
    root = tmp_path / "data"
    root.mkdir()
    (root / "notes.jsonl").write_text('{"text": "one two three four five six"}\n')
    (tmp_path / "outside.txt").write_text("one two three")
    tokenizer = build_tiny_tokenizer()
    run = get_method("lora").run
    ctx = context(tmp_path, data_roots=(root,))
    common = {**QUICK, "text_samples": 4, "text_window": 8, "target_modules": ["q_proj"]}
    for text in ("notes.jsonl", "wikitext-2/valid.tokens"):
        result = run(tiny_model("llama"), tokenizer, LoraEditConfig(text=text, **common), ctx)
        assert result.metrics["train_steps"] == 1
    for text in (str(tmp_path / "outside.txt"), "../outside.txt", "missing.txt"):
        with pytest.raises(ValueError, match=r"^text: "):
            run(tiny_model("llama"), tokenizer, LoraEditConfig(text=text, **common), ctx)


def test_prune_then_lora_recovery_in_one_job_exports_plain_weights(
    job_env: dict[str, Any], tmp_path: Path
) -> None:
    prune = {
        "method": "prune",
        "kind": "structured",
        "ratio": 0.25,
        "calibration_samples": 4,
        "calibration_seqlen": 16,
        "measure_latency": False,
    }
    lora = {
        "method": "lora",
        "text": "wikitext-2/valid.tokens",
        "text_samples": 16,
        "text_window": 32,
        "epochs": 2,
        "lr": 0.01,
    }
    evaluation = {"perplexity_tokens": 256, "perplexity_window": 256}
    done = run_job(job_env, [prune, lora], evaluation=evaluation)
    assert done.state == "SUCCEEDED", done.error
    m = done.metrics
    assert m["op1.perplexity_before"] == pytest.approx(m["op0.perplexity_after"], rel=1e-6)
    assert m["op1.perplexity_after"] < m["op1.perplexity_before"]
    store = job_env["store"]
    manifest = store.get(done.version_id)
    assert manifest.operations[1]["lr"] == 0.01 and "alpha" in manifest.operations[1]
    widths = {e.shape[0] for n, e in manifest.tensors.items() if n.endswith("up_proj.weight")}
    assert widths == {96}
    with warnings.catch_warnings():
        warnings.simplefilter("error", HookedExportWarning)
        folder = store.export(done.version_id, tmp_path / "export")
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    ours = load(done.version_id, store=store).model
    torch.testing.assert_close(logits(plain), logits(ours), atol=1e-5, rtol=1e-5)


def test_facts_job_is_judged_on_its_facts(job_env: dict[str, Any]) -> None:
    lora = {"method": "lora", "facts": [FACT], "epochs": 10, "lr": 0.02, **QUICK}
    done = run_job(job_env, [lora])
    assert done.state == "SUCCEEDED", done.error
    assert done.metrics["efficacy"] == 1.0
    assert 0.0 <= done.metrics["locality"] <= 1.0
