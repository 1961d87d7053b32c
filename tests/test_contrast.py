"""Contrast pairs and their activations, shared by steer, iti and ablate_direction."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from modelsurgery.editing.contrast import (
    PairsSource,
    TextPair,
    contrast_direction,
    head_inputs,
    load_text_pairs,
    projections,
    residual_outputs,
)
from modelsurgery.editing.contrast.pairs import split_held_out
from modelsurgery.models.adapters import get_adapter

TEXTS = ["a short one", "a much longer text than the others", "mid length text"]


def test_residual_outputs_do_not_depend_on_the_batch(tiny_llama, tiny_tokenizer) -> None:
    together = residual_outputs(tiny_llama, tiny_tokenizer, TEXTS, [0, 1], batch_size=3)
    alone = torch.cat([residual_outputs(tiny_llama, tiny_tokenizer, [t], [0, 1]) for t in TEXTS])
    assert together.shape == (3, 2, 64)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    mean = residual_outputs(tiny_llama, tiny_tokenizer, TEXTS, [1], token="mean", batch_size=3)
    mean_alone = residual_outputs(tiny_llama, tiny_tokenizer, TEXTS[1:2], [1], token="mean")
    torch.testing.assert_close(mean[1], mean_alone[0], rtol=1e-5, atol=1e-5)


def test_residual_outputs_are_the_layer_outputs(tiny_llama, tiny_tokenizer) -> None:
    ids = tiny_tokenizer(TEXTS[1], return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = tiny_llama(ids, output_hidden_states=True).hidden_states
    got = residual_outputs(tiny_llama, tiny_tokenizer, TEXTS[1:2], [0])
    torch.testing.assert_close(got[0, 0], hidden[1][0, -1])


def test_head_inputs_are_the_output_projection_input(tiny_llama, tiny_tokenizer) -> None:
    seen = {}
    o_proj = get_adapter(tiny_llama).attn_out(1).module
    handle = o_proj.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    with torch.no_grad():
        tiny_llama(tiny_tokenizer(TEXTS[0], return_tensors="pt").input_ids)
    handle.remove()
    got = head_inputs(tiny_llama, tiny_tokenizer, TEXTS[:1], [1])
    assert got.shape == (1, 1, 4, 16)
    torch.testing.assert_close(got[0, 0].reshape(-1), seen["x"][0, -1])


@pytest.mark.parametrize("aggregate", ["mean", "pca"])
def test_directions_recover_a_planted_difference(aggregate) -> None:
    torch.manual_seed(0)
    planted = torch.zeros(16)
    planted[3] = 2.0
    negative = torch.randn(40, 16)
    positive = negative + planted + 0.1 * torch.randn(40, 16)
    direction = contrast_direction(positive, negative, aggregate)
    assert direction.shape == (16,)
    cosine = torch.nn.functional.cosine_similarity(direction, planted, dim=0)
    assert cosine > 0.99
    assert direction.norm() == pytest.approx(2.0, rel=0.05)
    gaps = projections(positive, direction) - projections(negative, direction)
    assert gaps.mean() == pytest.approx(2.0, rel=0.05)


def test_pairs_sources(tmp_path) -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        PairsSource()
    inline = PairsSource(pairs=[TextPair(positive="a", negative="b")] * 2)
    assert len(load_text_pairs(inline, ())) == 2
    (tmp_path / "bad.jsonl").write_text('{"positive": "a"}\n')
    with pytest.raises(ValueError, match="line 1"):
        load_text_pairs(PairsSource(pairs_file="bad.jsonl"), (tmp_path,))
    fit, held = split_held_out([TextPair(positive=str(i), negative="n") for i in range(8)], 0.25, 0)
    assert len(fit) == 6 and len(held) == 2
    assert not {p.positive for p in fit} & {p.positive for p in held}
    assert split_held_out(fit[:2], 0.5, 0)[1] == []
