"""EasyEdit hparams files configure ``rome`` and ``memit`` as they are."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from modelsurgery.editing.memit import MemitConfig
from modelsurgery.editing.rome import RomeConfig

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


def test_rome_hparams_file_becomes_our_config() -> None:
    config = RomeConfig(method="rome", facts=[FACT], **yaml.safe_load(ROME_YAML))
    assert config.layer == 5 and config.v_steps == 25 and config.v_lr == 0.5
    assert config.weight_decay == 1e-3 and config.clamp_factor == 4
    assert config.kl_factor == 0.0625 and config.use_mom2 is False
    assert config.stats_samples == 100000


def test_memit_hparams_file_becomes_our_config() -> None:
    config = MemitConfig(method="memit", facts=[FACT], **yaml.safe_load(MEMIT_YAML))
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
