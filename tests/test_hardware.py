"""Hardware-dependent defaults: ``auto`` dtypes follow what the device does fast, and the
version records what ``auto`` resolved to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_tokenizer, tiny_model

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.models.hardware import describe, resolve_dtype
from modelsurgery.server.executor import WorkerSettings, execute_job
from modelsurgery.server.model_cache import ModelCache


def pretend_cpu(monkeypatch: pytest.MonkeyPatch, *, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [
        (False, False, torch.float32),
        (True, False, torch.bfloat16),
        (False, True, torch.bfloat16),
    ],
)
def test_auto_is_bfloat16_only_on_cpus_with_native_bf16(
    monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool, expected: torch.dtype
) -> None:
    pretend_cpu(monkeypatch, avx512_bf16=avx512_bf16, amx=amx)
    assert resolve_dtype("auto", "cpu") == expected
    assert resolve_dtype("float32", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert f"avx512_bf16 {avx512_bf16}" in describe("cpu")
    assert describe("cpu").endswith(f"auto dtype {str(expected).removeprefix('torch.')}")


@pytest.mark.parametrize(("avx512_bf16", "recorded"), [(False, "float32"), (True, "bfloat16")])
def test_prune_version_records_the_resolved_calibration_dtype(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, avx512_bf16: bool, recorded: str
) -> None:
    pretend_cpu(monkeypatch, avx512_bf16=avx512_bf16, amx=False)
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    data = tmp_path / "data"
    data.mkdir()
    record = json.dumps({"text": "the capital of france is paris . " * 20})
    (data / "calibration.jsonl").write_text(f"{record}\n")
    store = CheckpointStore(tmp_path / "store")
    settings = WorkerSettings(
        store_root=tmp_path / "store", cache_dir=tmp_path / "cache", data_roots=(data,)
    )
    operation = {
        "method": "prune",
        "calibration_samples": 2,
        "calibration_seqlen": 16,
        "calibration_data": "calibration.jsonl",
        "evaluate_perplexity": False,
    }
    outcome = execute_job(
        {"base": str(folder), "operations": [operation]},
        store=store,
        cache=ModelCache(1 << 30),
        settings=settings,
        emit=lambda event: None,
        is_cancelled=lambda: False,
    )
    assert outcome.state == "SUCCEEDED", outcome.error
    assert store.get(outcome.version_id).operations[0]["calibration_dtype"] == recorded
