"""The `prune` config: validation against a model config names the field; the registered entry
point builds calibration windows from user JSONL data under the allowed roots only."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from conftest import tiny_config, tiny_model, word_level_tokenizer
from pydantic import ValidationError
from tokenizers.pre_tokenizers import Split
from transformers import PreTrainedTokenizerFast

from modelsurgery.editing.registry import MethodContext, get_method
from modelsurgery.pruning import prune as prune_module
from modelsurgery.pruning.config import PruneConfig

LLAMA = tiny_config("llama")


def check(fields: dict[str, object], model_config: object = LLAMA) -> str:
    """The error message a config gets, from pydantic or from check_against."""
    try:
        PruneConfig(method="prune", **fields).check_against(model_config)
    except ValidationError as err:
        first = err.errors()[0]
        return f"{'.'.join(map(str, first['loc']))}: {first['msg']}"
    except ValueError as err:
        return str(err)
    return ""


@pytest.mark.parametrize(
    ("fields", "prefix"),
    [
        ({"layers": [0, 5], "kind": "unstructured"}, "layers[1]: layer 5 out of range"),
        ({"kind": "nm", "n": 4, "m": 4}, "n: N (4) must be smaller than M (4)"),
        ({"kind": "nm", "n": 2, "m": 48}, "m: M=48 does not divide"),
        ({"kind": "structured", "prune_heads": 2}, "prune_heads: removing 2 of 2"),
        ({"kind": "structured", "prune_heads": 1.5}, "prune_heads: ratio 1.5"),
        ({"kind": "unstructured", "prune_heads": 1}, "prune_heads: head pruning needs"),
        ({"ratio": 1.0}, "ratio: Input should be less than 1"),
        ({"ratio": 0.0}, "ratio: Input should be greater than 0"),
        ({"kind": "structured", "layers": [1]}, "layers: pruning a subset"),
        ({"per_layer_ratios": {0: 1.2}}, "per_layer_ratios: Value error, per_layer_ratios[0]"),
        ({"per_layer_ratios": {7: 0.2}}, "per_layer_ratios[7]: layer 7 out of range"),
        (
            {"kind": "structured", "per_layer_ratios": {0: 0.2, 1: 0.4}},
            "per_layer_ratios: different ratios",
        ),
        ({"kind": "unstructured", "bias_compensation": True}, "bias_compensation: only for"),
        ({"kind": "nm", "score": "activation"}, "score: 'activation' is for kind"),
        ({"kund": "nm"}, "kund: Extra inputs are not permitted"),
        ({"kind": "structured", "refit": "sparsegpt"}, "refit: only for kinds"),
        ({"kind": "structured", "score": "ria"}, "score: 'ria' is for kinds"),
        ({"refit": "admm"}, "refit: Input should be 'none' or 'sparsegpt'"),
        ({"refit_damping": 0.0}, "refit_damping: Input should be greater than 0"),
        ({"refit_inputs": "both"}, "refit_inputs: Input should be 'pruned' or 'dense'"),
        ({"kind": "structured", "refit_inputs": "dense"}, "refit_inputs: only with refit"),
        ({"score": "wanda", "refit_inputs": "dense"}, "refit_inputs: only with refit"),
        ({"kind": "structured", "per_layer_ratios": "owl"}, "per_layer_ratios: 'owl' is for"),
        ({"per_layer_ratios": "owls"}, "per_layer_ratios"),
        ({"per_layer_ratios": "owl", "ratio": 0.95}, "owl_lambda: ratio 0.95 +- 0.08"),
        ({"owl_lambda": 0.6}, "owl_lambda: Input should be less than 0.5"),
    ],
)
def test_config_errors_name_the_field(fields: dict[str, object], prefix: str) -> None:
    message = check(fields)
    if message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
    assert message.removeprefix(": Value error, ").startswith(prefix), message


def test_valid_configs_pass() -> None:
    assert check({"kind": "nm", "n": 4, "m": 8}) == ""
    assert check({"kind": "structured", "ratio": 0.2, "prune_heads": 1}) == ""
    assert check({"kind": "structured", "layers": [1], "uniform_widths": False}) == ""


def test_defaults_resolve_score_and_refit() -> None:
    """Nothing named: the measured best pair; a score alone: that score, no refit."""
    default = PruneConfig().resolved(LLAMA)
    assert (default.score, default.refit) == ("wanda", "sparsegpt")
    nm = PruneConfig(kind="nm").with_defaults()
    assert (nm.score, nm.refit) == ("ria", "sparsegpt")
    wanda = PruneConfig(score="wanda").resolved(LLAMA)
    assert (wanda.score, wanda.refit) == ("wanda", "none")
    refit_only = PruneConfig(kind="nm", refit="sparsegpt").with_defaults()
    assert (refit_only.score, refit_only.refit) == ("ria", "sparsegpt")
    structured = PruneConfig(kind="structured").with_defaults()
    assert (structured.score, structured.refit, structured.refit_inputs) == ("wanda", "none", None)


def test_refit_inputs_resolve_with_the_refit() -> None:
    """The refit's inputs inside a layer: a pass per group on the pruned modules unless
    given (the better on dev); no refit, none recorded (``score: wanda`` stays Wanda)."""
    assert PruneConfig(kind="nm").with_defaults().refit_inputs == "pruned"
    assert PruneConfig(kind="unstructured").with_defaults().refit_inputs == "pruned"
    pinned = PruneConfig(kind="nm", refit_inputs="dense").with_defaults()
    assert pinned.refit_inputs == "dense"
    assert PruneConfig(kind="nm", score="wanda").with_defaults().refit_inputs is None


def test_owl_and_explicit_ratios_select_layers() -> None:
    owl = PruneConfig(per_layer_ratios="owl", ratio=0.7)
    assert owl.selected_layers(3) == [0, 1, 2] and owl.layer_ratio(1) == 0.7
    assert check({"per_layer_ratios": "owl", "ratio": 0.7}) == ""
    explicit = PruneConfig(per_layer_ratios={"1": 0.4})
    assert explicit.selected_layers(3) == [1] and explicit.layer_ratio(1) == 0.4


def test_head_pruning_rejected_for_fused_qkv() -> None:
    assert check({"kind": "structured", "prune_heads": 1}, tiny_config("gpt2")).startswith(
        "prune_heads: head pruning is not supported for model type 'gpt2'"
    )


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer built offline (ids stay under the tiny model's vocab)."""
    chars = ["[UNK]", *string.printable[:100]]
    return word_level_tokenizer(chars, Split("", behavior="isolated"), unk_token="[UNK]")


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    lines = [
        json.dumps({"text": f"Calibration sentence number {i} about pruning."}) for i in range(40)
    ]
    (root / "calib.jsonl").write_text("\n".join(lines), encoding="utf-8")
    return root


def test_registered_run_uses_jsonl_under_data_roots(data_root: Path, tmp_path: Path) -> None:
    assert get_method("prune").run is prune_module.run
    model = tiny_model("llama")
    events: list[dict[str, object]] = []
    context = MethodContext(
        model_digest="t", cache_dir=tmp_path, data_roots=(data_root,), report=events.append
    )
    config = PruneConfig(
        kind="structured",
        ratio=0.5,
        calibration_data="calib.jsonl",
        calibration_samples=4,
        calibration_seqlen=24,
        evaluate_perplexity=False,
        measure_latency=False,
    )
    result = get_method("prune").run(model, char_tokenizer(), config, context)
    assert result.config_overrides == {"intermediate_size": 64}
    assert result.metrics["parameter_ratio"] < 1.0
    assert [e["step"] for e in events if "step" in e] == [1, 2]


def test_calibration_data_outside_roots_is_rejected(data_root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.jsonl"
    outside.write_text(json.dumps({"text": "x" * 100}), encoding="utf-8")
    model = tiny_model("llama")
    context = MethodContext(model_digest="t", cache_dir=tmp_path, data_roots=(data_root,))
    for path in (str(outside), "../outside.jsonl"):
        config = PruneConfig(calibration_data=path, evaluate_perplexity=False)
        with pytest.raises(ValueError, match=r"^calibration_data: "):
            prune_module.run(model, char_tokenizer(), config, context)
