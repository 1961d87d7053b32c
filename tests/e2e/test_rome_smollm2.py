"""ROME and MEMIT on the real SmolLM2-135M, method level (no server): one CounterFact case."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from modelsurgery.editing.data import shared_data_path
from modelsurgery.editing.memit import MemitConfig
from modelsurgery.editing.memit import run as memit_run
from modelsurgery.editing.registry import MethodContext
from modelsurgery.editing.rome import RomeConfig
from modelsurgery.editing.rome import run as rome_run
from modelsurgery.evaluation.measure import JobMeasurements
from modelsurgery.evaluation.metrics import FACTS
from modelsurgery.models import load
from modelsurgery.models.adapters import get_adapter

pytestmark = pytest.mark.e2e

CHEAP = {"stats_samples": 32, "stats_window": 128, "evaluate_perplexity": False}


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    return load("smollm2-135m")


def cases(n: int) -> list[dict]:
    return json.loads(shared_data_path("counterfact/counterfact-dev.json").read_text())[:n]


def edited(run: Any, model: Any, tok: Any, config: Any, ctx: MethodContext) -> tuple[Any, dict]:
    """The method's result, and the fact figures a job measures around it."""
    measurements, measured = JobMeasurements(tok, None), frozenset({FACTS})
    measurements.before_operation(0, model, measured, config.facts)
    result = run(model, tok, config, ctx)
    return result, measurements.operation_figures(0, model, measured, config.facts)


def test_rome_edit_on_smollm2(smollm2, tmp_path: Path) -> None:
    model, tok = smollm2.model, smollm2.tokenizer
    adapter = get_adapter(model)
    original = adapter.mlp_out(5).weight.detach().clone()
    ctx = MethodContext(model_digest=smollm2.digest, cache_dir=tmp_path)
    try:
        result, figures = edited(rome_run, model, tok, RomeConfig(facts=cases(1), **CHEAP), ctx)
        assert list(result.changed) == ["model.layers.5.mlp.down_proj.weight"]
        assert figures["efficacy"] == 1.0
        assert figures["locality"] >= 0.9
        change = adapter.mlp_out(5).weight.detach() - original
        assert torch.linalg.matrix_rank(change.double(), rtol=1e-6) == 1
    finally:
        with torch.no_grad():
            adapter.mlp_out(5).weight.copy_(original)


def test_memit_batch_on_smollm2(smollm2, tmp_path: Path) -> None:
    model, tok = smollm2.model, smollm2.tokenizer
    ctx = MethodContext(model_digest=smollm2.digest, cache_dir=tmp_path)
    config = MemitConfig(facts=cases(4), layers=[4, 5], **CHEAP)
    result, figures = edited(memit_run, model, tok, config, ctx)
    assert len(result.changed) == 2
    assert figures["efficacy"] >= 0.75
