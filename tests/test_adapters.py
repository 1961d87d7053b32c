"""Adapters against tiny random models of every supported family (transformers' own classes)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import transformers as tf
from conftest import tiny_model
from torch import nn

from modelsurgery.models.adapters import (
    FAMILIES,
    ArchitectureAdapter,
    Projection,
    UnsupportedArchitectureError,
    get_adapter,
)

VOCAB = 128


@dataclass(frozen=True)
class Case:
    """Config fields over ``tiny_model``'s and the figures the adapter must read off the model."""

    fields: dict[str, object]
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int = 2


MLP = {"intermediate_size": 96}
CASES: dict[str, Case] = {
    "llama": Case(MLP, 64, 96, 4, 2, 16),
    "mistral": Case(MLP, 64, 96, 4, 2, 16),
    "qwen2": Case(MLP, 64, 96, 4, 2, 16),
    "qwen3": Case({**MLP, "head_dim": 24}, 64, 96, 4, 2, 24),
    # Gemma: head_dim * heads != hidden, so o_proj is [hidden, heads * head_dim].
    "gemma": Case({**MLP, "head_dim": 32}, 64, 96, 4, 2, 32),
    "gemma2": Case({**MLP, "head_dim": 32}, 64, 96, 4, 2, 32),
    "gemma3_text": Case({**MLP, "head_dim": 32, "num_key_value_heads": 1}, 64, 96, 4, 1, 32),
    # GPT-2 / GPT-J leave n_inner unset: the MLP is 4 * hidden wide.
    "gpt2": Case({}, 64, 256, 4, 4, 16),
    "gpt_neox": Case(MLP, 64, 96, 4, 4, 16),
    "gptj": Case({}, 64, 256, 4, 4, 16),
    "opt": Case({"ffn_dim": 96, "word_embed_proj_dim": 32}, 64, 96, 4, 4, 16),
    "phi": Case(MLP, 64, 96, 4, 4, 16),
}


def _build(family: str, **fields: object) -> nn.Module:
    return tiny_model(family, **{**CASES[family].fields, **fields})


@pytest.fixture(scope="module", params=sorted(CASES))
def built(request: pytest.FixtureRequest) -> tuple[Case, nn.Module, ArchitectureAdapter]:
    case = CASES[request.param]
    model = _build(request.param)
    return case, model, get_adapter(model)


def test_every_family_in_table_is_covered() -> None:
    assert set(CASES) <= set(FAMILIES)
    assert {"llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text"} <= set(CASES)


def test_figures(built: tuple[Case, nn.Module, ArchitectureAdapter]) -> None:
    case, _, adapter = built
    assert adapter.num_layers == case.layers == len(adapter.layers())
    assert adapter.hidden_size == case.hidden
    assert adapter.intermediate_size == case.intermediate
    assert adapter.num_heads == case.heads
    assert adapter.num_kv_heads == case.kv_heads
    assert adapter.head_dim == case.head_dim


def test_mlp_shapes(built: tuple[Case, nn.Module, ArchitectureAdapter]) -> None:
    case, _, adapter = built
    for i in range(case.layers):
        assert adapter.mlp_out(i).weight.shape == (case.hidden, case.intermediate)
        ins = adapter.mlp_in(i)
        assert len(ins) == (2 if adapter.layout.gated_mlp else 1)
        for module in ins:
            proj = Projection(module, adapter.layout.conv1d)
            assert proj.weight.shape == (case.intermediate, case.hidden)


def test_attention_shapes(built: tuple[Case, nn.Module, ArchitectureAdapter]) -> None:
    case, _, adapter = built
    attn_width = case.heads * case.head_dim
    kv_width = case.kv_heads * case.head_dim
    assert adapter.attn_out(0).weight.shape == (case.hidden, attn_width)
    qkv = {
        name: Projection(module, adapter.layout.conv1d).weight.shape
        for name, module in adapter.attn_qkv(1).items()
    }
    if adapter.layout.fused_qkv is not None:
        assert qkv == {"qkv": (attn_width + 2 * kv_width, case.hidden)}
    else:
        assert qkv == {
            "q": (attn_width, case.hidden),
            "k": (kv_width, case.hidden),
            "v": (kv_width, case.hidden),
        }
    last = adapter.head_columns(case.heads - 1)
    assert (last.start, last.stop) == (attn_width - case.head_dim, attn_width)


def test_projection_computes_module_output(
    built: tuple[Case, nn.Module, ArchitectureAdapter],
) -> None:
    """``W x + b`` with the [out, in] weight equals the module's forward (Conv1D included)."""
    case, _, adapter = built
    torch.manual_seed(1)
    for proj, width in (
        (adapter.mlp_out(0), case.intermediate),
        (adapter.attn_out(1), case.heads * case.head_dim),
    ):
        x = torch.randn(3, width)
        expected = x @ proj.weight.T + (proj.bias if proj.bias is not None else 0)
        torch.testing.assert_close(proj.module(x), expected)


def test_paths_name_the_same_modules(built: tuple[Case, nn.Module, ArchitectureAdapter]) -> None:
    _, model, adapter = built
    assert model.get_submodule(adapter.mlp_out_path(1)) is adapter.mlp_out(1).module
    assert model.get_submodule(adapter.attn_out_path(0)) is adapter.attn_out(0).module
    assert adapter.embed() is model.get_input_embeddings()
    assert adapter.lm_head() is model.get_output_embeddings()


def test_unembed_reproduces_model_logits(
    built: tuple[Case, nn.Module, ArchitectureAdapter],
) -> None:
    case, model, adapter = built
    captured: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: object, output: object) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = adapter.layer(case.layers - 1).register_forward_hook(keep)
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        handle.remove()
        torch.testing.assert_close(adapter.unembed(captured[0]), logits)


def test_layer_index_out_of_range(built: tuple[Case, nn.Module, ArchitectureAdapter]) -> None:
    case, _, adapter = built
    with pytest.raises(IndexError, match="out of range"):
        adapter.layer(case.layers)
    with pytest.raises(IndexError, match="out of range"):
        adapter.head_columns(case.heads)


def test_conv1d_weight_is_transposed_view_that_writes_through() -> None:
    model = _build("gpt2")
    proj = get_adapter(model).mlp_out(0)
    assert proj.module.weight.shape == (256, 64)  # Conv1D keeps [in, out]
    with torch.no_grad():
        proj.weight[3, 7] = 42.0
    assert proj.module.weight[7, 3].item() == 42.0


def test_gqa_kv_groups() -> None:
    adapter = get_adapter(_build("llama"))
    assert [adapter.kv_group(h) for h in range(4)] == [0, 0, 1, 1]


def test_opt_projections() -> None:
    adapter = get_adapter(_build("opt"))
    project_in, project_out = adapter.project_in(), adapter.project_out()
    assert project_in is not None and project_out is not None
    assert project_in.weight.shape == (64, 32)
    assert project_out.weight.shape == (32, 64)
    square = get_adapter(_build("llama"))
    assert square.project_in() is None and square.project_out() is None


def test_opt_without_final_norm_gets_identity() -> None:
    adapter = get_adapter(_build("opt", word_embed_proj_dim=768, do_layer_norm_before=False))
    assert isinstance(adapter.final_norm(), nn.Identity)


def test_gpt_neox_lm_head_is_not_tied() -> None:
    model = _build("gpt_neox")
    adapter = get_adapter(model)
    assert adapter.lm_head().weight.shape == (VOCAB, 64)
    assert adapter.lm_head().weight.data_ptr() != adapter.embed().weight.data_ptr()


def test_unsupported_architecture_names_it() -> None:
    torch.manual_seed(0)
    bert = tf.BertForMaskedLM(
        tf.BertConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=VOCAB,
        )
    )
    with pytest.raises(UnsupportedArchitectureError, match=r"'bert'.*BertForMaskedLM.*llama"):
        get_adapter(bert)


def test_module_without_config_is_unsupported() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="None"):
        get_adapter(nn.Linear(2, 2))
