"""EasyEdit hparams files configure ``rome`` and ``memit`` as they are."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from modelsurgery.editing.knowledge.easyedit import LargeStatisticsWarning
from modelsurgery.editing.memit import MemitConfig
from modelsurgery.editing.rome import RomeConfig
from modelsurgery.proto.spec import spec_json_schema

FACT = {"prompt": "{} speaks", "subject": "she", "target_new": "japanese"}
# hparams/ROME/llama-7b.yaml and hparams/MEMIT/llama-7b.yaml as EasyEdit ships them.
ROME_YAML = """
alg_name: "ROME"
model_name: "./hugging_cache/llama-7b"
stats_dir: "./data/stats"
device: 0
layers: [5]
fact_token: "subject_last"
v_num_grad_steps: 25
v_lr: 5e-1
v_loss_layer: 31
v_weight_decay: 1e-3
clamp_norm_factor: 4
kl_factor: 0.0625
mom2_adjustment: false
context_template_length_params: [[5, 10], [10, 10]]
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
model_parallel: false
fp16: false
"""
MEMIT_YAML = """
alg_name: "MEMIT"
model_name: "./hugging_cache/llama-7b"
device: 0
layers: [4, 5, 6, 7, 8]
clamp_norm_factor: 0.75
layer_selection: "all"
fact_token: "subject_last"
v_num_grad_steps: 25
v_lr: 5e-1
v_loss_layer: 31
v_weight_decay: 0.5
kl_factor: 0.0625
mom2_adjustment: true
mom2_update_weight: 15000
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
"""


def ours(text: str) -> dict:
    """A shipped hparams file with its statistics on WikiText (Wikipedia is not available)."""
    return {**yaml.safe_load(text), "mom2_dataset": "wikitext"}


def test_rome_hparams_file_becomes_our_config() -> None:
    with pytest.warns(LargeStatisticsWarning):
        config = RomeConfig(method="rome", facts=[FACT], **ours(ROME_YAML))
    assert config.layer == 5 and config.v_steps == 25 and config.v_lr == 0.5
    assert config.weight_decay == 1e-3 and config.clamp_factor == 4
    assert config.kl_factor == 0.0625 and config.use_mom2 is False
    assert config.stats_samples == 100000


def test_memit_hparams_file_becomes_our_config() -> None:
    with pytest.warns(LargeStatisticsWarning):
        config = MemitConfig(method="memit", facts=[FACT], **ours(MEMIT_YAML))
    assert config.layers == [4, 5, 6, 7, 8] and config.mom2_weight == 15000
    assert config.clamp_factor == 0.75 and config.weight_decay == 0.5


@pytest.mark.parametrize(
    ("cls", "extra", "field"),
    [
        (RomeConfig, {"alg_name": "MEMIT"}, "alg_name"),
        (RomeConfig, {"layers": [4, 5]}, "layers"),
        (RomeConfig, {"fact_token": "last"}, "fact_token"),
        (MemitConfig, {"layer_selection": "random"}, "layer_selection"),
        (RomeConfig, {"v_num_grad_steps": 5, "v_steps": 5}, "v_num_grad_steps"),
    ],
)
def test_hparams_we_cannot_honour_are_errors(cls: type, extra: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        cls(facts=[FACT], **extra)


def test_our_own_spelling_is_unchanged() -> None:
    config = MemitConfig(facts=[FACT], layers=[2, 3], v_lr=0.1)
    assert config.layers == [2, 3] and config.v_lr == 0.1
    with pytest.raises(ValidationError, match="not_a_field"):
        RomeConfig(facts=[FACT], not_a_field=1)


def test_shipped_hparams_honour_what_means_ours_and_warn_about_statistics_time() -> None:
    """``mom2_dataset: wikipedia`` is refused (we compute C on WikiText-2); with the values
    that mean ours, the file loads and its 100,000 statistics windows warn with the time."""
    values = yaml.safe_load(ROME_YAML)
    with pytest.raises(ValidationError, match=r"mom2_dataset: 'wikipedia' cannot be honoured"):
        RomeConfig(method="rome", facts=[FACT], **values)
    values["mom2_dataset"] = "wikitext"
    with pytest.warns(LargeStatisticsWarning, match=r"mom2_n_samples: 100000 .* h per"):
        config = RomeConfig(method="rome", facts=[FACT], **values)
    assert config.v_loss_layer == 31 and config.stats_samples == 100000


@pytest.mark.parametrize(
    ("extra", "field"),
    [({"mom2_dtype": "float16"}, "mom2_dtype"), ({"mom2_dataset": "wikipedia"}, "mom2_dataset")],
)
def test_mom2_values_we_cannot_honour_are_errors(extra: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=f"{field}: .* cannot be honoured"):
        MemitConfig(facts=[FACT], **extra)


def test_v_loss_layer_must_be_the_last_layer() -> None:
    config = SimpleNamespace(num_hidden_layers=4, model_type="llama")
    RomeConfig(facts=[FACT], layers=[1], v_loss_layer=3).check_against(config)
    with pytest.raises(ValueError, match=r"^v_loss_layer: .* last layer \(3\)"):
        MemitConfig(facts=[FACT], layers=[1], v_loss_layer=2).check_against(config)


def test_schema_accepts_what_the_server_accepts() -> None:
    """An editor validating a spec with ``modelsurgery schema`` accepts EasyEdit's keys."""
    values = ours(MEMIT_YAML)
    spec = {"base": "smollm2-135m", "operations": [{"method": "memit", "facts": [FACT], **values}]}
    Draft202012Validator(spec_json_schema()).validate(spec)
    spec["operations"][0]["not_a_key"] = 1
    assert not Draft202012Validator(spec_json_schema()).is_valid(spec)
