"""Resolved configs (issue 28): a version records every value its operations ran with, so the
record alone reproduces the version. ``MethodConfig.resolved`` fills what ``run`` would choose
from the model; ``operation_from_record`` turns a stored operation back into a config."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_editable, build_tiny_tokenizer, write_corpus
from transformers import GPT2Config, LlamaConfig

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.editing.data import DATA_ENV
from modelsurgery.editing.registry import (
    MethodContext,
    config_class,
    get_method,
    operation_from_record,
)
from modelsurgery.server.executor import WorkerSettings, execute_job, load_base
from modelsurgery.server.model_cache import ModelCache

FACTS = [
    {"prompt": "the capital of {} is", "subject": "france", "target_new": "rome"},
    {"prompt": "{} speaks", "subject": "she", "target_new": "japanese"},
]
PAIRS = [
    {"positive": "good big new", "negative": "bad small old"},
    {"positive": "he is a good doctor", "negative": "he is a bad doctor"},
    {"positive": "the new city", "negative": "the old city"},
    {"positive": "good football", "negative": "bad football"},
]
# Fields each config leaves unset below and ``resolved`` must fill.
VSTAR = ["v_steps", "v_lr", "kl_factor", "weight_decay", "clamp_factor"]
KNOWLEDGE = [*VSTAR, "context_templates", "nullspace_threshold", "nullspace_l2"]
LORA = ["alpha", "dropout", "lr", "epochs", "batch_size", "layers"]
CASES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "rome": ({"method": "rome", "facts": FACTS[:1]}, ["layer", *KNOWLEDGE]),
    "memit": ({"method": "memit", "facts": FACTS}, ["layers", "mom2_weight", *KNOWLEDGE]),
    "prune": ({"method": "prune"}, ["layers"]),
    "steer": ({"method": "steer", "pairs": PAIRS}, ["layers"]),
    "iti": ({"method": "iti", "pairs": PAIRS}, ["layers"]),
    "lora-facts": (
        {"method": "lora", "facts": FACTS},
        [*LORA, "kl_factor", "context_templates"],
    ),
    "lora-text": ({"method": "lora", "text": "wikitext-2/valid.tokens"}, LORA),
    "ablate_direction": ({"method": "ablate_direction", "dataset": "winogender"}, ["layer"]),
    "mask_biased_heads": ({"method": "mask_biased_heads", "bias_types": ["gender"]}, ["top_k"]),
}
# The family defaults documented for SmolLM2-135M (30 layers) in each config's docstring.
SMOLLM2_CHOICES: dict[str, dict[str, Any]] = {
    "rome": {"layer": 5, "weight_decay": 1e-3, "clamp_factor": 4.0},
    "memit": {"layers": list(range(2, 9)), "mom2_weight": 5000.0, "clamp_factor": 4.0},
    "steer": {"layers": [10]},
    "lora-facts": {"layers": list(range(2, 9))},
    "ablate_direction": {"layer": 14},
    "mask_biased_heads": {"top_k": 3},
}


def smollm2_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
    )


def config_of(case: str) -> Any:
    data, _ = CASES[case]
    return config_class(data["method"]).model_validate(data)


@pytest.mark.parametrize("case", sorted(CASES))
def test_resolved_fills_every_field_run_chooses(case: str) -> None:
    config, filled = config_of(case), CASES[case][1]
    assert all(getattr(config, name) is None for name in filled)
    resolved = config.resolved(smollm2_config())
    assert [name for name in filled if getattr(resolved, name) is None] == []
    for name, value in SMOLLM2_CHOICES.get(case, {}).items():
        assert getattr(resolved, name) == value, name
    assert resolved.resolved(smollm2_config()) == resolved
    assert operation_from_record(resolved.model_dump(mode="json")) == resolved


def test_defaults_follow_the_family() -> None:
    """GPT-2 XL's layers (Meng et al.) and each method's own clamp."""
    gpt2_xl = GPT2Config(n_layer=48, n_head=25, n_embd=1600)
    rome, memit = (config_of(case).resolved(gpt2_xl) for case in ("rome", "memit"))
    assert (rome.layer, rome.clamp_factor) == (17, 4.0)
    assert (memit.layers, memit.clamp_factor) == (list(range(13, 18)), 0.75)
    assert memit.mom2_weight == 20000.0


def test_resolved_keeps_values_the_spec_gives() -> None:
    config = config_class("memit").model_validate(
        {"method": "memit", "facts": FACTS, "layers": [1, 3], "v_lr": 0.1, "mom2_weight": 7.0}
    )
    resolved = config.resolved(smollm2_config())
    assert (resolved.layers, resolved.v_lr, resolved.mom2_weight) == ([1, 3], 0.1, 7.0)


def test_record_drops_what_run_reported_besides_the_config() -> None:
    record = {
        **config_of("rome").model_dump(mode="json"),
        "statistics": {"1": {"key_digest": "d", "samples": 16, "window": 32, "seed": 0}},
        "null_space": {"threshold": 2.0},
    }
    assert operation_from_record(record) == config_of("rome")
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        operation_from_record({"method": "nope"})


def test_resolving_and_rebuilding_import_no_ml_stack() -> None:
    """The thin client validates specs and reads manifests without torch."""
    code = textwrap.dedent(
        """
        import json, sys
        from types import SimpleNamespace
        from modelsurgery.editing.registry import config_class, operation_from_record
        model = SimpleNamespace(model_type="llama", num_hidden_layers=30, num_attention_heads=9)
        for data in json.loads(sys.argv[1]):
            config = config_class(data["method"]).model_validate(data)
            operation_from_record(config.resolved(model).model_dump(mode="json"))
        heavy = ("torch", "transformers", "peft", "safetensors")
        print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
        """
    )
    cases = json.dumps([data for data, _ in CASES.values()])
    probe = subprocess.run(
        [sys.executable, "-c", code, cases], capture_output=True, text=True, check=False
    )
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout) == []


# --- run(config) == run(config.resolved(model.config)) --------------------------------------
QUICK_FACTS = {"stats_samples": 16, "stats_window": 32, "evaluate": False}
BIAS_PAIRS = [
    {"stereo": f"{a} is a good {role} .", "anti": f"{b} is a good {role} ."}
    for role in ("doctor", "nurse", "engineer")
    for a, b in (("he", "she"), ("she", "he"))
]
RUNS: dict[str, dict[str, Any]] = {
    "rome": {"method": "rome", "facts": FACTS[:1], **QUICK_FACTS},
    "memit": {"method": "memit", "facts": FACTS, **QUICK_FACTS},
    "prune": {"method": "prune", "calibration_samples": 4, "calibration_seqlen": 32},
    "steer": {"method": "steer", "pairs": PAIRS},
    "iti": {"method": "iti", "pairs": PAIRS, "top_k": 2},
    "lora": {"method": "lora", "facts": FACTS, "epochs": 1},
    "ablate_direction": {"method": "ablate_direction", "pairs": PAIRS, "calibration_windows": 1},
    "mask_biased_heads": {
        "method": "mask_biased_heads",
        "pairs": BIAS_PAIRS,
        "shortlist_size": 4,
        "calibration_windows": 1,
    },
}


@pytest.mark.parametrize("method", sorted(RUNS))
def test_run_of_the_resolved_config_changes_the_same_tensors(
    method: str, base_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``resolved`` chooses exactly what ``run`` would have chosen itself."""
    monkeypatch.setenv(DATA_ENV, str(base_folder.parent / "data"))
    given = {"evaluate_perplexity": False, **RUNS[method]}
    config = config_class(method).model_validate(given)
    run = get_method(method).run
    tokenizer = build_tiny_tokenizer()
    changed = []
    for operation in (config, config.resolved(build_editable("llama").config)):
        context = MethodContext(model_digest="base", cache_dir=tmp_path / "cache")
        changed.append(run(build_editable("llama"), tokenizer, operation, context).changed)
    assert set(changed[0]) == set(changed[1]) and changed[0]
    assert all(torch.equal(changed[0][name], changed[1][name]) for name in changed[0])


# --- a job rebuilt from a version's manifest reproduces it ---------------------------------
JOBS: dict[str, dict[str, Any]] = {
    "rome": {"method": "rome", "facts": FACTS[:1], **QUICK_FACTS},
    "memit": {"method": "memit", "facts": FACTS, **QUICK_FACTS},
    "prune": {
        "method": "prune",
        "kind": "structured",
        "ratio": 0.25,
        "calibration_samples": 4,
        "calibration_seqlen": 32,
        "measure_latency": False,
    },
    "steer": {"method": "steer", "pairs": PAIRS, "coefficient": 4.0},
}
# Besides the config's own choices: what only the run decides (recorded from its report).
RUN_FILLED = {"steer": ["bake"]}


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer editable Llama saved as a Hugging Face folder, with WikiText-2 stand-ins."""
    root = tmp_path_factory.mktemp("resolved")
    write_corpus(root / "data")
    folder = root / "tiny"
    build_editable("llama").save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def worker(root: Path) -> dict[str, Any]:
    """A store, model cache and statistics cache of their own: nothing carries over."""
    return {
        "store": CheckpointStore(root / "store"),
        "cache": ModelCache(1 << 30),
        "settings": WorkerSettings(store_root=root / "store", cache_dir=root / "cache"),
    }


def run_job(env: dict[str, Any], spec: dict[str, Any]) -> str:
    outcome = execute_job(spec, **env, emit=lambda event: None, is_cancelled=lambda: False)
    assert outcome.state == "SUCCEEDED", outcome.error
    assert outcome.version_id is not None
    return outcome.version_id


@pytest.mark.parametrize("method", sorted(JOBS))
def test_job_rebuilt_from_the_manifest_reproduces_the_version(
    method: str, base_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATA_ENV, str(base_folder.parent / "data"))
    operation = {"evaluate_perplexity": False, **JOBS[method]}
    first_env = worker(tmp_path / "first")
    first = first_env["store"].get(
        run_job(first_env, {"base": str(base_folder), "operations": [operation]})
    )
    (record,) = first.operations
    case = next(c for c, (data, _) in CASES.items() if data["method"] == method)
    unset = [*CASES[case][1], *RUN_FILLED.get(method, [])]
    assert {name: record[name] for name in unset if record[name] is None} == {}

    again = worker(tmp_path / "again")
    imported = load_base(str(base_folder), again["store"], again["cache"], again["settings"])
    assert imported.version_id == first.parent
    rebuilt = operation_from_record(record).model_dump(mode="json")
    second = again["store"].get(run_job(again, {"base": first.parent, "operations": [rebuilt]}))

    assert second.operations == first.operations
    assert second.config_overrides == first.config_overrides
    assert set(second.tensors) == set(first.tensors) and first.tensors
    for name in first.tensors:
        ours, theirs = (
            first_env["store"].tensor(first.id, name),
            again["store"].tensor(second.id, name),
        )
        assert torch.equal(ours, theirs), name
    assert second.id == first.id
