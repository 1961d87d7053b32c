"""The concept_bottleneck method on a tiny random Llama: config validation, data reading,
training with masks, the version's artifacts round-trip, metrics, and the registry seam."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_tokenizer, tiny_model
from pydantic import ValidationError

from modelsurgery.editing.attachments import attach_hooks
from modelsurgery.editing.concepts import (
    ConceptBottleneckConfig,
    attached_bottleneck,
    predict_concepts,
)
from modelsurgery.editing.concepts.bottleneck import BottleneckSpec, new_spec
from modelsurgery.editing.concepts.config import CONCEPT_VALUES
from modelsurgery.editing.concepts.saliency import scheduled_sparsity, top_mask
from modelsurgery.editing.concepts.train import new_bottleneck
from modelsurgery.editing.registry import MethodContext, config_class, get_method

POSITIVE = ["the food was good", "good city good food", "the tower is good and big"]
NEGATIVE = ["the food was bad", "bad city bad food", "the tower is bad and old"]


def write_examples(root: Path, repeat: int = 4) -> Path:
    lines = []
    for _ in range(repeat):
        for text in POSITIVE:
            lines.append({"text": text, "label": "5", "concepts": {"food": "Positive"}})
        for text in NEGATIVE:
            lines.append({"text": text, "label": "1", "concepts": {"food": "Negative"}})
    path = root / "reviews.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    return path


def job_operation(layer: int) -> dict[str, object]:
    """A one-concept ``concept_bottleneck`` job on ``write_examples``' file with its masks on
    ``layer``: what the serving tests submit."""
    return {
        "method": "concept_bottleneck",
        "examples_file": "reviews.jsonl",
        "concepts": ["food"],
        "layers": [layer],
        "epochs": 6,
        "lr": 0.05,
        "backbone_lr": 0.0,
        "batch_size": 6,
        "max_tokens": 16,
        "sparsity": 0.5,
    }


def small_config(**overrides: object) -> ConceptBottleneckConfig:
    fields = {
        "examples_file": "reviews.jsonl",
        "concepts": ["food", "service"],
        "layers": [1],
        "epochs": 8,
        "sparsity": 0.5,
        "lr": 0.05,
        "backbone_lr": 0.0,
        "batch_size": 6,
        "max_tokens": 16,
        "eval_fraction": 0.25,
        "fisher_batches": 2,
    }
    return ConceptBottleneckConfig.model_validate({**fields, **overrides})


def test_config_needs_one_data_source_and_names_bad_fields() -> None:
    with pytest.raises(ValidationError, match="dataset: give exactly one"):
        ConceptBottleneckConfig(concepts=["food"])
    with pytest.raises(ValidationError, match="concepts: CEBaB has no concept 'price'"):
        ConceptBottleneckConfig(dataset="cebab", concepts=["price"])
    with pytest.raises(ValidationError, match=r"layers\[1\]: layer 3 is listed twice"):
        ConceptBottleneckConfig(dataset="cebab", layers=[3, 3])
    config = ConceptBottleneckConfig.model_validate({"dataset": "cebab", "lambda": 2.0})
    assert config.lambda_ == 2.0 and config.sparsity == 0.7 and config.saliency == "fisher"
    assert config_class("concept_bottleneck") is ConceptBottleneckConfig
    assert config.shared_data() == {"dataset": ("cebab/train_exclusive.json", "cebab/dev.json")}


def test_default_layers_are_the_top_two_and_checked_against_the_model() -> None:
    model = tiny_model("llama", num_hidden_layers=4)
    config = ConceptBottleneckConfig(dataset="cebab")
    assert config.resolved(model.config).layers == [2, 3]
    with pytest.raises(ValueError, match=r"layers\[0\]: layer 9 out of range"):
        ConceptBottleneckConfig(dataset="cebab", layers=[9]).check_against(model.config)


def test_sparsity_rises_linearly_from_the_second_epoch() -> None:
    assert [scheduled_sparsity(0.6, e, 4) for e in range(4)] == pytest.approx([0, 0.2, 0.4, 0.6])
    mask = top_mask(torch.tensor([[[3.0, 1.0], [2.0, 0.0]]]), 0.5)
    assert mask.tolist() == [[[True, False], [True, False]]]


def test_bad_examples_file_lines_are_named(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text(
        '{"text": "x", "label": "1", "concepts": {"food": "Great"}}\n', encoding="utf-8"
    )
    model, tokenizer = tiny_model("llama"), build_tiny_tokenizer()
    context = MethodContext(model_digest="t", cache_dir=tmp_path, data_roots=(tmp_path,))
    run = get_method("concept_bottleneck").run
    with pytest.raises(ValueError, match=r"line 1 of bad.jsonl: concepts.food must be one of"):
        run(model, tokenizer, small_config(examples_file="bad.jsonl"), context)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    root = tmp_path_factory.mktemp("concepts")
    write_examples(root)
    model, tokenizer = tiny_model("llama"), build_tiny_tokenizer()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    context = MethodContext(model_digest="t", cache_dir=root, data_roots=(root,))
    config = small_config(compare_dense=True)
    result = get_method("concept_bottleneck").run(model, tokenizer, config, context)
    return model, tokenizer, result, before


def test_training_learns_the_concept_and_label_and_leaves_weights_alone(trained: tuple) -> None:
    model, _, result, before = trained
    m = result.metrics
    assert result.changed == {}
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert m["concept_accuracy_food"] == 1.0 and m["task_accuracy"] == 1.0
    assert m["dense_task_accuracy"] == 1.0
    assert m["mask_density"] == pytest.approx(0.5, abs=1e-3)
    assert 0.0 <= m["mask_overlap_layer1"] <= 1.0
    assert m["eval_examples"] == 6.0 and m["train_examples"] == 18.0
    assert set(
        ConceptBottleneckConfig.model_validate(
            small_config(compare_dense=True).model_dump()
        ).metric_names()
    ) <= set(m)


def test_the_stored_bottleneck_attaches_and_predicts(trained: tuple) -> None:
    model, tokenizer, result, _ = trained
    assert sorted(result.artifacts) == ["concepts/config.json", "concepts/state.safetensors"]
    assert json.loads(result.artifacts["concepts/config.json"])["label_input"] == "probabilities"
    with attach_hooks(model, result.artifacts) as hooks:
        assert hooks.methods == ["concept_bottleneck"]
        bottleneck = attached_bottleneck(model)
        assert 0.49 < bottleneck.mask_density() < 0.51
        out = predict_concepts(model, tokenizer, bottleneck, ["bad city bad food", "good food"])
        assert [p.concepts["food"] for p in out] == ["Negative", "Positive"]
        assert [p.label for p in out] == ["1", "5"]
        assert out[0].label_before is None
    with pytest.raises(ValueError, match="carries no concept bottleneck"):
        attached_bottleneck(model)


@pytest.mark.parametrize("label_input", ["logits", "probabilities"])
def test_the_label_head_reads_what_the_spec_records(label_input: str) -> None:
    model = tiny_model("llama")
    spec = new_spec(
        model, ["food", "service"], CONCEPT_VALUES, ["1", "5"], [1], 16, True, label_input
    )
    bottleneck = new_bottleneck(spec, model, seed=0)
    concept_logits = [torch.tensor([[4.0, 0.0, -2.0]]), torch.tensor([[0.0, 1.0, 0.5]])]
    read = (
        [c.softmax(-1) for c in concept_logits]
        if label_input == "probabilities"
        else concept_logits
    )
    expected = bottleneck.label_head(torch.cat(read, dim=-1))
    assert torch.equal(bottleneck.label_logits(concept_logits), expected)
    other = [c.softmax(-1) for c in concept_logits] if label_input == "logits" else concept_logits
    assert not torch.allclose(
        bottleneck.label_logits(concept_logits), bottleneck.label_head(torch.cat(other, -1))
    )


def test_a_version_written_before_label_input_keeps_reading_probabilities() -> None:
    spec = new_spec(
        tiny_model("llama"), ["food"], CONCEPT_VALUES, ["1", "5"], [1], 16, True, "logits"
    )
    old = {k: v for k, v in json.loads(spec.model_dump_json()).items() if k != "label_input"}
    assert BottleneckSpec.model_validate(old).label_input == "probabilities"


def test_label_input_is_checked_and_named() -> None:
    assert small_config().label_input == "probabilities"
    with pytest.raises(ValidationError, match="label_input"):
        small_config(label_input="scores")
