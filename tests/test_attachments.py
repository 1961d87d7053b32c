"""The seam for hook methods: registration rules, attaching any method's files, and the
lineage rules submit validation applies."""

from __future__ import annotations

import pytest
from conftest import tiny_config

from modelsurgery.editing import registry
from modelsurgery.editing.attachments import (
    combination_error,
    hook_artifact_names,
    leaf_methods,
)
from modelsurgery.editing.mask_heads import MaskHeadsConfig
from modelsurgery.editing.reft import CONFIG_ARTIFACT as REFT_CONFIG
from modelsurgery.editing.reft import ReftConfig
from modelsurgery.editing.steer import CONFIG_ARTIFACT as STEER_CONFIG
from modelsurgery.editing.steer import SteerConfig

LLAMA, MISTRAL = tiny_config("llama"), tiny_config("mistral")
PAIRS = [{"positive": "good", "negative": "bad"}, {"positive": "yes", "negative": "no"}]


def reft() -> ReftConfig:
    return ReftConfig.model_validate(
        {"layers": [0], "examples": [{"prompt": "a", "completion": "b"}]}
    )


def steer(**overrides: object) -> SteerConfig:
    return SteerConfig.model_validate({"pairs": PAIRS, "layers": [0], **overrides})


def mask() -> MaskHeadsConfig:
    return MaskHeadsConfig.model_validate({"heads": ["0.1"]})


def test_hook_methods_declare_their_files() -> None:
    names = {m.name for m in registry.hook_methods()}
    assert {"reft", "steer"} <= names
    assert {REFT_CONFIG, STEER_CONFIG} <= hook_artifact_names()
    assert "rome" not in names


def test_a_name_or_an_artifact_registered_twice_is_an_error(monkeypatch) -> None:
    registry.load_builtin_methods()
    for table in ("_CONFIGS", "_LOADERS", "_METHODS"):
        monkeypatch.setattr(registry, table, dict(getattr(registry, table)))
    reft_method = registry.get_method("reft")
    with pytest.raises(ValueError, match="'reft' is already registered"):
        registry.register_method(
            "reft", ReftConfig, lambda: registry.Implementation(reft_method.run)
        )
    registry.register_method(
        "reft2",
        ReftConfig,
        lambda: registry.Implementation(reft_method.run, reft_method.attachment),
    )
    with pytest.raises(ValueError, match="belong to 'reft'"):
        registry.get_method("reft2")
    empty = registry.Attachment((), lambda m, a: None)
    registry.register_method(
        "empty", ReftConfig, lambda: registry.Implementation(reft_method.run, empty)
    )
    with pytest.raises(ValueError, match="at least one artifact"):
        registry.get_method("empty")


def test_versions_carrying_leaf_hooks_are_no_base() -> None:
    assert leaf_methods([REFT_CONFIG, "reft/interventions.safetensors"]) == ["reft"]
    assert leaf_methods([STEER_CONFIG, "evaluation/suite.json"]) == ["steer"]
    assert leaf_methods(["head_scores.json"]) == []
    problem = combination_error([STEER_CONFIG], [mask()], LLAMA)
    assert problem is not None and problem.startswith("base: the version carries steer hooks")


@pytest.mark.parametrize(
    ("operations", "model_config", "field"),
    [
        ([mask(), reft()], LLAMA, None),
        ([reft(), mask()], LLAMA, "operations[1]"),
        ([reft(), reft()], LLAMA, "operations[1]"),
        ([steer(), mask()], LLAMA, None),  # baked: plain weights, anything may follow
        ([steer(bake=False), mask()], LLAMA, "operations[1]"),
        ([steer(positions="generated"), mask()], LLAMA, "operations[1]"),
        ([steer(), mask()], MISTRAL, "operations[1]"),  # no MLP bias: hooks
        ([steer(), reft()], LLAMA, None),
        ([steer(bake=False), reft()], LLAMA, "operations[1]"),
    ],
)
def test_a_leaf_runs_last_and_once(operations, model_config, field) -> None:
    problem = combination_error([], operations, model_config)
    if field is None:
        assert problem is None
    else:
        assert problem is not None and problem.split(": ")[0] == field, problem
