"""steer: vectors from contrast pairs, baked into MLP output biases or attached as hooks."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from modelsurgery.editing.attachments import attach_hooks
from modelsurgery.editing.registry import MethodContext, get_method
from modelsurgery.editing.steer import (
    CONFIG_ARTIFACT,
    VECTORS_ARTIFACT,
    SteerConfig,
    SteeringVectors,
)
from modelsurgery.editing.steer.hooks import attach
from modelsurgery.models import load

PAIRS = [
    {"positive": "good great fine", "negative": "bad awful poor"},
    {"positive": "happy joy", "negative": "sad grief"},
    {"positive": "love it", "negative": "hate it"},
    {"positive": "kind warm", "negative": "cruel cold"},
]
PROMPT = "the weather today is"


def config(**overrides: object) -> SteerConfig:
    values: dict[str, object] = {
        "pairs": PAIRS,
        "layers": [0],
        "coefficient": 4.0,
        "holdout_fraction": 0.25,
        "evaluate_perplexity": False,
    }
    return SteerConfig.model_validate(values | overrides)


def context(tmp_path: Path) -> MethodContext:
    return MethodContext(model_digest="test", cache_dir=tmp_path)


def ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer(PROMPT).input_ids])


def test_config_needs_exactly_one_pair_source() -> None:
    with pytest.raises(ValidationError, match="exactly one of pairs and pairs_file"):
        SteerConfig.model_validate({})
    with pytest.raises(ValidationError, match="exactly one"):
        SteerConfig.model_validate({"pairs": PAIRS, "pairs_file": "p.jsonl"})
    with pytest.raises(ValidationError, match="at least 2"):
        SteerConfig.model_validate({"pairs": PAIRS[:1]})
    with pytest.raises(ValidationError, match="bake"):
        config(bake=True, positions="generated")


def test_check_against_layers_and_bake(tiny_llama) -> None:
    with pytest.raises(ValueError, match=r"^layers\[0\]: layer 7 out of range"):
        config(layers=[7]).check_against(tiny_llama.config)
    with pytest.raises(ValueError, match=r"^bake: mistral has no MLP output bias"):
        config(bake=True).check_against(tiny_model("mistral").config)
    assert config().bakes(tiny_llama.config) and not config().leaves_hooks(tiny_llama.config)
    assert config().leaves_hooks(tiny_model("mistral").config)
    assert config(positions="generated").leaves_hooks(tiny_llama.config)
    assert config(layers=None).layer_indices(tiny_llama.config) == [0]


def steered(builder, tokenizer, tmp_path: Path, **overrides: object):
    model = builder()
    return model, get_method("steer").run(model, tokenizer, config(**overrides), context(tmp_path))


@pytest.mark.parametrize("builder", [partial(tiny_model, "llama"), partial(tiny_model, "gpt2")])
def test_baked_bias_equals_the_hook(builder, tiny_tokenizer, tmp_path) -> None:
    baked_model, baked = steered(builder, tiny_tokenizer, tmp_path)
    hooked_model, hooked = steered(builder, tiny_tokenizer, tmp_path, bake=False)
    assert baked.metrics["baked"] == 1.0 and not baked.artifacts
    assert hooked.metrics["baked"] == 0.0 and not hooked.changed
    assert set(hooked.artifacts) == {CONFIG_ARTIFACT, VECTORS_ARTIFACT}
    with torch.no_grad():
        plain = hooked_model(ids(tiny_tokenizer)).logits
        with attach_hooks(hooked_model, hooked.artifacts) as hooks:
            assert hooks.methods == ["steer"]
            expected = hooked_model(ids(tiny_tokenizer)).logits
        got = baked_model(ids(tiny_tokenizer)).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)
    assert baked.metrics["projection_after"] > baked.metrics["projection_before"]
    assert baked.metrics["projection_after"] == pytest.approx(hooked.metrics["projection_after"])


def test_llama_bake_sets_the_flag_and_stores_every_new_bias(tiny_llama, tiny_tokenizer, tmp_path):
    result = get_method("steer").run(tiny_llama, tiny_tokenizer, config(), context(tmp_path))
    assert result.config_overrides == {"mlp_bias": True}
    expected = {
        f"model.layers.{i}.mlp.{p}.bias"
        for i in range(2)
        for p in ("gate_proj", "up_proj", "down_proj")
    }
    assert set(result.changed) == expected
    steered_bias = result.changed["model.layers.0.mlp.down_proj.bias"]
    assert steered_bias.norm() > 0
    assert result.changed["model.layers.1.mlp.down_proj.bias"].norm() == 0


def test_baked_version_exports_to_plain_transformers(store, tiny_tokenizer, tmp_path) -> None:
    model = tiny_model("llama")
    base = store.import_model(model, tiny_tokenizer, reference="tiny")
    result = get_method("steer").run(model, tiny_tokenizer, config(), context(tmp_path))
    version = store.commit(
        base.id,
        result.changed,
        operations=[config().model_dump(mode="json")],
        config_overrides=result.config_overrides,
    )
    folder = store.export(version.id, tmp_path / "export")
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    reloaded = load(version.id, store=store).model
    with torch.no_grad():
        want = model(ids(tiny_tokenizer)).logits
        torch.testing.assert_close(plain(ids(tiny_tokenizer)).logits, want)
        torch.testing.assert_close(reloaded(ids(tiny_tokenizer)).logits, want)


def test_hook_version_loads_with_its_vectors(store, tiny_tokenizer, tmp_path) -> None:
    model = tiny_model("mistral")
    base = store.import_model(model, tiny_tokenizer, reference="tiny-mistral")
    result = get_method("steer").run(model, tiny_tokenizer, config(), context(tmp_path))
    assert result.metrics["baked"] == 0.0
    version = store.commit(
        base.id, {}, operations=[config().model_dump(mode="json")], artifacts=result.artifacts
    )
    with torch.no_grad():
        plain = model(ids(tiny_tokenizer)).logits
        with attach_hooks(model, result.artifacts):
            want = model(ids(tiny_tokenizer)).logits
        loaded = load(version.id, store=store)
        assert loaded.hooks.methods == ["steer"]
        torch.testing.assert_close(loaded.model(ids(tiny_tokenizer)).logits, want)
        folder = store.export(version.id, tmp_path / "export")
        from_folder = load(folder)
        torch.testing.assert_close(from_folder.model(ids(tiny_tokenizer)).logits, want)
        from_folder.hooks.remove()
        torch.testing.assert_close(from_folder.model(ids(tiny_tokenizer)).logits, plain)


def test_generated_positions_leave_the_prompt_alone(tiny_tokenizer) -> None:
    model = tiny_model("llama")
    steering = SteeringVectors([0], torch.full((1, 64), 0.5), positions="generated")
    prompt = ids(tiny_tokenizer)
    with torch.no_grad():
        plain = model(prompt).logits
        handle = attach(model, steering)
        prefill = model(prompt).logits
        out = model.generate(prompt, max_new_tokens=3, do_sample=False)
        handle.remove()
        every = attach(model, SteeringVectors([0], steering.vectors))
        all_positions = model(prompt).logits
        every.remove()
    # Only the last prompt position (which predicts the first new token) is steered.
    torch.testing.assert_close(prefill[:, :-1], plain[:, :-1])
    assert not torch.allclose(prefill[:, -1], plain[:, -1])
    assert not torch.allclose(all_positions[:, :-1], plain[:, :-1])
    assert out.shape[1] == prompt.shape[1] + 3


def test_generated_positions_with_left_padding(tiny_tokenizer) -> None:
    """A left-padded row is steered at its own last token, like the same prompt alone."""
    model = tiny_model("llama")
    steering = SteeringVectors([1], torch.full((1, 64), 0.5), positions="generated")
    short = tiny_tokenizer("hi").input_ids
    long = tiny_tokenizer(PROMPT).input_ids
    pad = [3] * (len(long) - len(short))
    batch = torch.tensor([pad + short, long])
    mask = torch.tensor([[0] * len(pad) + [1] * len(short), [1] * len(long)])
    with torch.no_grad():
        handle = attach(model, steering)
        padded = model(input_ids=batch, attention_mask=mask).logits
        alone = model(torch.tensor([short])).logits
        handle.remove()
    torch.testing.assert_close(padded[0, -1], alone[0, -1], rtol=1e-4, atol=1e-4)


def test_pairs_file_under_data_roots(tiny_tokenizer, tmp_path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    lines = [f'{{"positive": "{p["positive"]}", "negative": "{p["negative"]}"}}' for p in PAIRS]
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    cfg = config(pairs=None, pairs_file="pairs.jsonl")
    ctx = MethodContext(model_digest="t", cache_dir=tmp_path, data_roots=(root,))
    result = get_method("steer").run(tiny_model("llama"), tiny_tokenizer, cfg, ctx)
    assert result.metrics["pairs_fitted"] == 3.0
    with pytest.raises(ValueError, match="pairs_file"):
        get_method("steer").run(
            tiny_model("llama"), tiny_tokenizer, config(pairs=None, pairs_file="../x.jsonl"), ctx
        )
