"""mask_heads: a masked head contributes nothing, nothing else changes, configs are validated."""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from pydantic import ValidationError

import modelsurgery.editing.mask_heads  # noqa: F401  (registers the method)
from modelsurgery.editing.registry import MethodContext, get_method
from modelsurgery.models.adapters import get_adapter
from modelsurgery.models.digest import persistent_state_dict

# MODELS[family]() builds a fresh seeded model with 64 positions and no pad id.
TINY = {"max_position_embeddings": 64, "pad_token_id": None}
MODELS = {family: partial(tiny_model, family, **TINY) for family in ("llama", "gpt2")}


def context(tmp_path: Path) -> MethodContext:
    return MethodContext(model_digest="test", cache_dir=tmp_path)


def zero_head_hook(model: torch.nn.Module, layer: int, head: int):
    """Reference: zero one head's slice of the o_proj input at run time."""
    adapter = get_adapter(model)
    cols = adapter.head_columns(head)

    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]):
        x = args[0].clone()
        x[..., cols] = 0
        return (x, *args[1:])

    return adapter.attn_out(layer).module.register_forward_pre_hook(hook)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_masked_head_equals_runtime_zeroing(family: str, tmp_path: Path) -> None:
    model = MODELS[family]()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    handles = [zero_head_hook(reference, 1, 2), zero_head_hook(reference, 0, 0)]
    with torch.no_grad():
        expected = reference(ids).logits
        unmasked = model(ids).logits
    for h in handles:
        h.remove()

    method = get_method("mask_heads")
    config = method.config_class(heads=["1.2", "0.0"])
    config.check_against(model.config)
    result = method.run(model, None, config, context(tmp_path))
    with torch.no_grad():
        got = model(ids).logits

    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - unmasked).abs().max() > 1e-3  # masking did something
    assert result.metrics == {"heads_masked": 2.0}


@pytest.mark.parametrize("family", sorted(MODELS))
def test_only_masked_columns_change(family: str, tmp_path: Path) -> None:
    model = MODELS[family]()
    before = {k: v.clone() for k, v in persistent_state_dict(model).items()}
    method = get_method("mask_heads")
    result = method.run(model, None, method.config_class(heads=["1.3"]), context(tmp_path))
    after = persistent_state_dict(model)
    adapter = get_adapter(model)
    name = f"{adapter.attn_out_path(1)}.weight"

    assert set(result.changed) == {name}
    assert result.changed[name].shape == before[name].shape
    torch.testing.assert_close(result.changed[name], after[name], rtol=0, atol=0)
    for key, value in before.items():
        if key != name:
            assert torch.equal(after[key], value), key
    as_out_in = (lambda w: w.t()) if family == "gpt2" else (lambda w: w)
    new_w, old_w = as_out_in(after[name]), as_out_in(before[name])
    cols = adapter.head_columns(3)
    assert torch.count_nonzero(new_w[:, cols]) == 0
    keep = torch.ones(new_w.shape[1], dtype=torch.bool)
    keep[cols] = False
    assert torch.equal(new_w[:, keep], old_w[:, keep])


def test_gqa_masks_one_query_head_not_its_kv_group(tmp_path: Path) -> None:
    """Heads 0 and 1 share KV head 0; masking head 0 must leave head 1's output intact."""
    model = MODELS["llama"]()
    adapter = get_adapter(model)
    assert adapter.kv_group(0) == adapter.kv_group(1)
    method = get_method("mask_heads")
    method.run(model, None, method.config_class(heads=["0.0"]), context(tmp_path))
    w = adapter.attn_out(0).weight
    assert torch.count_nonzero(w[:, adapter.head_columns(0)]) == 0
    kept = w[:, adapter.head_columns(1)]
    assert torch.count_nonzero(kept) == kept.numel()


def test_config_rejects_bad_heads() -> None:
    config_class = get_method("mask_heads").config_class
    with pytest.raises(ValidationError, match="heads"):
        config_class(heads=[])
    with pytest.raises(ValidationError, match=r"heads\[1\]: .*not of the form"):
        config_class(heads=["0.1", "3"])
    with pytest.raises(ValidationError, match=r"heads\[2\]: duplicate of heads\[0\]"):
        config_class(heads=["0.1", "1.1", "0.1"])
    with pytest.raises(ValidationError):
        config_class(heads=["0.1"], unknown=True)


def test_check_against_names_the_field() -> None:
    config_class = get_method("mask_heads").config_class
    model_config = MODELS["llama"]().config
    config_class(heads=["1.3"]).check_against(model_config)
    with pytest.raises(ValueError, match=r"^heads\[1\]: head 4 out of range \(model has 4 heads\)"):
        config_class(heads=["0.0", "1.4"]).check_against(model_config)
    with pytest.raises(ValueError, match=r"^heads\[0\]: layer 2 out of range \(model has 2 "):
        config_class(heads=["2.0"]).check_against(model_config)
    with pytest.raises(ValueError, match=r"^heads\[0\]: head 4 out of range"):
        config_class(heads=["0.4"]).check_against(MODELS["gpt2"]().config)
