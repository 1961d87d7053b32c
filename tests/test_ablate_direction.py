"""ablate_direction: weight orthogonalisation removes a direction from every residual-stream
write (GPT-2 and Llama), equals the activation-space ablation, unties a tied head; mean fill
holds every layer's component along it at its calibration mean; a stored or exported version
rebuilds either."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import TINY_VOCAB_SIZE, tiny_model
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, GemmaConfig, MistralConfig, OPTConfig

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.editing.ablate_direction import (
    AblateDirectionConfig,
    ablate_in_place,
    layer_mean_projections,
    orthogonalise_in_place,
    unsupported_reason,
)
from modelsurgery.editing.registry import MethodContext, get_method
from modelsurgery.editing.stereotypes.winogender import load_winogender, winogender_stereo_pairs
from modelsurgery.evaluation.metrics import PAIRS
from modelsurgery.models import load
from modelsurgery.models.adapters import get_adapter
from modelsurgery.models.digest import persistent_state_dict

BUILDERS: dict[str, Callable[..., torch.nn.Module]] = {
    family: partial(tiny_model, family) for family in ("llama", "gpt2")
}
PAIRS_TEXT = [
    {"positive": f"she is a good {role} .", "negative": f"he is a good {role} ."}
    for role in ["doctor", "nurse", "engineer", "football", "piano", "city", "language"]
]


def unit_direction(hidden: int, seed: int = 7) -> torch.Tensor:
    d = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    return d / d.norm()


def random_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(4, TINY_VOCAB_SIZE, (3, 12), generator=torch.Generator().manual_seed(seed))


def layer_outputs(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every decoder layer's output at every position, (B, T, H) each."""
    adapter = get_adapter(model)
    seen: list[torch.Tensor] = []
    handles = [
        adapter.layer(i).register_forward_hook(
            lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out)
        )
        for i in range(adapter.num_layers)
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def context(tmp_path: Path) -> MethodContext:
    return MethodContext(model_digest="test", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_no_layer_output_has_a_component_along_d(family: str) -> None:
    model = BUILDERS[family](tie_word_embeddings=True)
    d = unit_direction(64)
    before = layer_outputs(model, random_ids())
    assert min(float((h @ d).abs().mean()) for h in before) > 1e-2
    orthogonalise_in_place(model, 3.0 * d)  # any length: only the direction counts
    for seed in range(3):
        for h in layer_outputs(model, random_ids(seed)):
            # (B, T) projections vs the states' own size
            assert float((h @ d).abs().max()) < 1e-5 * float(h.norm(dim=-1).mean())


def _hook_ablation(model: torch.nn.Module, unit: torch.Tensor) -> list:
    """Activation-space ablation x <- x - (x.d) d on every residual-stream write."""
    adapter = get_adapter(model)

    def remove(_module: torch.nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out - (out @ unit)[..., None] * unit

    writers = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    for layer in range(adapter.num_layers):
        writers += [adapter.attn_out(layer).module, adapter.mlp_out(layer).module]
    return [m.register_forward_hook(remove) for m in writers]


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_weights_equal_the_activation_ablation(family: str) -> None:
    """Same logits as ablating d from every write of the unedited model, whose (tied) head
    is untouched: only d is removed, every other direction of every write is kept."""
    reference = BUILDERS[family](seed=1, tie_word_embeddings=True)
    edited = BUILDERS[family](seed=1, tie_word_embeddings=True)
    d = unit_direction(64, seed=3)
    orthogonalise_in_place(edited, d)
    handles = _hook_ablation(reference, d)
    ids = random_ids(5)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = edited(input_ids=ids).logits
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        assert not torch.allclose(reference(input_ids=ids).logits, got, atol=1e-3)


def tied_model_with_biases(family: str) -> torch.nn.Module:
    """A tied-embedding model whose output biases are non-zero (GPT-2 starts them at zero), so
    the bias edits are visible."""
    model = BUILDERS[family](tie_word_embeddings=True)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("c_proj.bias"):
                tensor.normal_(generator=torch.Generator().manual_seed(len(name)))
    return model


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_changed_tensors_and_the_orthogonal_complement(family: str) -> None:
    model = tied_model_with_biases(family)
    before = {k: v.clone() for k, v in persistent_state_dict(model).items()}
    embed_name = "model.embed_tokens.weight" if family == "llama" else "transformer.wte.weight"
    d = unit_direction(64, seed=11)
    result = orthogonalise_in_place(model, d)
    after = persistent_state_dict(model)
    # Exactly the writers changed, plus the untied head (new tensor, the original matrix).
    differ = {k for k in after if k not in before or not torch.equal(before[k], after[k])}
    assert set(result.changed) == differ
    assert result.config_overrides == {"tie_word_embeddings": False}
    assert model.config.tie_word_embeddings is False
    torch.testing.assert_close(after["lm_head.weight"], before[embed_name])
    assert model.lm_head.weight is not get_adapter(model).embed().weight
    adapter = get_adapter(model)
    expected = {embed_name, "lm_head.weight"}
    if family == "gpt2":
        expected.add("transformer.wpe.weight")
    for layer in range(adapter.num_layers):
        for path in (adapter.attn_out_path(layer), adapter.mlp_out_path(layer)):
            expected.add(f"{path}.weight")
            if family == "gpt2":
                expected.add(f"{path}.bias")
    assert set(result.changed) == expected
    # Rows of embeddings (and biases) and the projections' outputs: the part orthogonal to d
    # is unchanged, the part along d is gone.
    keep = torch.eye(64) - torch.outer(d, d)
    for name in expected - {"lm_head.weight"}:
        old, new = before[name], after[name]
        # Embedding rows, biases and GPT-2 Conv1D ([in, out]) have the hidden axis last.
        if family == "gpt2" or name == embed_name:
            torch.testing.assert_close(new @ keep, old @ keep, atol=1e-5, rtol=1e-5)
            assert float((new @ d).abs().max()) < 1e-5
        else:
            torch.testing.assert_close(keep @ new, keep @ old, atol=1e-5, rtol=1e-5)
            assert float((d @ new).abs().max()) < 1e-5


def calibration_ids() -> torch.Tensor:
    return torch.randint(
        4, TINY_VOCAB_SIZE, (4, 16), generator=torch.Generator().manual_seed(99)
    )  # (n, T)


def mean_projections_by_hand(model: torch.nn.Module, unit: torch.Tensor) -> torch.Tensor:
    """mu_L over every position of the calibration windows, from the layer outputs: (L,)."""
    return torch.stack(
        [(h.double() @ unit.double()).mean() for h in layer_outputs(model, calibration_ids())]
    )


def offset_direction(model: torch.nn.Module) -> torch.Tensor:
    """A unit direction along which the stream has a clear mean: the last layer's mean output,
    plus noise so the direction is not special."""
    mean = layer_outputs(model, calibration_ids())[-1].mean(dim=(0, 1))  # (H,)
    d = mean / mean.norm() + 0.3 * unit_direction(mean.numel(), seed=5)
    return d / d.norm()


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_mean_fill_holds_every_layer_at_its_mean(family: str) -> None:
    model = BUILDERS[family](seed=2, tie_word_embeddings=True)
    d = offset_direction(model)
    means = mean_projections_by_hand(model, d)  # (L,) of the unedited model
    scale = float(layer_outputs(model, calibration_ids())[-1].norm(dim=-1).mean())
    assert float(means.abs().min()) > 0.05 * scale  # a real offset to hold
    torch.testing.assert_close(layer_mean_projections(model, d, calibration_ids(), 3), means)
    result = ablate_in_place(model, 2.0 * d, fill="mean", calibration=calibration_ids())
    torch.testing.assert_close(result.held, means)
    for seed in range(3):
        for layer, h in enumerate(layer_outputs(model, random_ids(seed))):
            # Every position of every input, the same value: the variation along d is gone.
            assert float((h.double() @ d.double() - means[layer]).abs().max()) < 1e-5 * scale


def _hook_mean_ablation(model: torch.nn.Module, unit: torch.Tensor, means: torch.Tensor) -> list:
    """Activation-space mean ablation: remove d from every write, and add (mu_L - mu_{L-1}) d
    to layer L's MLP write."""
    handles = _hook_ablation(model, unit)
    adapter = get_adapter(model)
    steps = torch.diff(means.float(), prepend=torch.zeros(1))  # (L,)

    def add(step: float) -> Callable[..., torch.Tensor]:
        return lambda _m, _a, out: out + step * unit

    for layer in range(adapter.num_layers):
        module = adapter.mlp_out(layer).module
        handles.append(module.register_forward_hook(add(float(steps[layer]))))
    return handles


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_mean_fill_keeps_every_other_direction(family: str) -> None:
    """Same logits as the activation-space mean ablation of the unedited model, and not the
    zero ablation's: only the component along d changes, to its mean."""
    reference = BUILDERS[family](seed=1, tie_word_embeddings=True)
    edited = BUILDERS[family](seed=1, tie_word_embeddings=True)
    zeroed = BUILDERS[family](seed=1, tie_word_embeddings=True)
    d = offset_direction(reference)
    result = ablate_in_place(edited, d, fill="mean", calibration=calibration_ids())
    orthogonalise_in_place(zeroed, d)
    handles = _hook_mean_ablation(reference, d, mean_projections_by_hand(reference, d))
    ids = random_ids(5)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = edited(input_ids=ids).logits
        zero_logits = zeroed(input_ids=ids).logits
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, zero_logits, atol=1e-3)
    assert result.held.shape == (get_adapter(edited).num_layers,)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_mean_fill_changed_tensors(family: str) -> None:
    model = tied_model_with_biases(family)
    before = {k: v.clone() for k, v in persistent_state_dict(model).items()}
    result = ablate_in_place(
        model, unit_direction(64, seed=11), fill="mean", calibration=calibration_ids()
    )
    after = persistent_state_dict(model)
    new = set(after) - set(before)
    differ = {k for k in after if k in new or not torch.equal(before[k], after[k])}
    # Every added tensor is stored (zero gate/up biases included) and every edit is listed.
    assert set(result.changed) == differ and new <= set(result.changed)
    adapter = get_adapter(model)
    if family == "llama":
        assert result.config_overrides == {"tie_word_embeddings": False, "mlp_bias": True}
        assert new == {
            f"model.layers.{i}.mlp.{p}_proj.bias"
            for i in range(adapter.num_layers)
            for p in ("gate", "up", "down")
        } | {"lm_head.weight"}
        for name in (
            new
            - {"lm_head.weight"}
            - {f"{adapter.mlp_out_path(i)}.bias" for i in range(adapter.num_layers)}
        ):
            assert not after[name].any()  # gate/up: zero, so the MLP computes what it did
    else:
        assert result.config_overrides == {"tie_word_embeddings": False}
        assert new == {"lm_head.weight"}  # GPT-2's c_proj has a bias already


def test_mean_fill_needs_calibration_and_an_mlp_bias(tiny_llama) -> None:
    with pytest.raises(ValueError, match=r"^fill: mean needs calibration"):
        ablate_in_place(tiny_llama, unit_direction(64), fill="mean")
    mistral = MistralConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"^fill: mean needs a bias .* 'mistral' models cannot"):
        AblateDirectionConfig(dataset="winogender", fill="mean").check_against(mistral)
    AblateDirectionConfig(dataset="winogender", fill="zero").check_against(mistral)
    AblateDirectionConfig(dataset="winogender", fill="mean").check_against(tiny_llama.config)


def test_untied_model_keeps_its_head(tiny_llama) -> None:
    assert tiny_llama.config.tie_word_embeddings is False
    head = tiny_llama.lm_head.weight.clone()
    result = orthogonalise_in_place(tiny_llama, unit_direction(64))
    assert "lm_head.weight" not in result.changed and result.config_overrides == {}
    assert torch.equal(tiny_llama.lm_head.weight, head)


def test_refused_architectures() -> None:
    gemma2 = GemmaConfig(num_hidden_layers=2)
    gemma2.model_type = "gemma2"
    assert "normalises each sublayer" in (unsupported_reason(gemma2) or "")
    assert "post-LN" in (unsupported_reason(OPTConfig(do_layer_norm_before=False)) or "")
    assert unsupported_reason(OPTConfig()) is None
    config = AblateDirectionConfig(dataset="winogender")
    with pytest.raises(ValueError, match=r"^method: ablate_direction cannot orthogonalise"):
        config.check_against(gemma2)


@pytest.mark.parametrize("fill", ["zero", "mean"])
def test_run_on_pairs_reports_and_removes(
    fill: str, tiny_llama, tiny_tokenizer, tmp_path: Path
) -> None:
    method = get_method("ablate_direction")
    config = method.config_class(
        pairs=PAIRS_TEXT,
        layer=1,
        holdout_fraction=0.3,
        seed=2,
        fill=fill,
        calibration_windows=2,
        calibration_window=16,
    )
    config.check_against(tiny_llama.config)
    events: list[dict] = []
    ctx = context(tmp_path)
    ctx.report = events.append
    result = method.run(tiny_llama, tiny_tokenizer, config, ctx)
    m = result.metrics
    assert set(m) == config.metric_names()
    assert (m["pairs_fit"], m["pairs_heldout"]) == (5.0, 2.0)
    # The held-out "she" texts sit on the positive side of d before; after, every text sits
    # at the held value (0, or the calibration mean), so the two sides no longer separate.
    assert m["separation_before"] > 0.0 and m["projection_before"] > 0.0
    assert m["projection_after"] < 1e-5 * m["projection_before"]
    assert abs(m["separation_after"]) < 1e-5 * m["separation_before"]
    assert (m["fill_at_layer"] == 0.0) == (fill == "zero")
    assert result.suite == {} and config.carries == frozenset()
    assert result.resolved == {"layer": 1}
    assert result.config_overrides == ({"mlp_bias": True} if fill == "mean" else {})
    state = persistent_state_dict(tiny_llama)
    assert all(torch.equal(state[name], tensor) for name, tensor in result.changed.items())
    assert any(e["message"] == "reading the direction" for e in events)


def test_default_layer_is_resolved(tiny_llama, tiny_tokenizer, tmp_path: Path) -> None:
    config = AblateDirectionConfig(pairs=PAIRS_TEXT, evaluate_perplexity=False, token="last")
    run = get_method("ablate_direction").run
    result = run(tiny_llama, tiny_tokenizer, config, context(tmp_path))
    assert result.resolved == {"layer": config.resolved_layer(2)}
    assert result.metrics["projection_after"] < 1e-5 * result.metrics["projection_before"]


def test_gender_dataset_carries_held_out_crows_pairs(tiny_gpt2, tiny_tokenizer, tmp_path) -> None:
    config = AblateDirectionConfig(
        dataset="winogender", layer=0, evaluate_perplexity=False, batch_size=64
    )
    run = get_method("ablate_direction").run
    result = run(tiny_gpt2, tiny_tokenizer, config, context(tmp_path))
    m = result.metrics
    assert set(m) == config.metric_names() and config.carries == frozenset({PAIRS})
    assert (m["pairs_fit"], m["pairs_heldout"], m["bias_pairs_heldout"]) == (120.0, 120.0, 131.0)
    assert len(result.suite[PAIRS]) == 131 and set(result.suite[PAIRS][0]) == {"stereo", "anti"}
    assert 0.0 <= m["stereotype_share_after"] <= 1.0
    assert "lm_head.weight" in result.changed and "transformer.wpe.weight" in result.changed


@pytest.mark.parametrize(("family", "fill"), [(f, x) for f in BUILDERS for x in ("zero", "mean")])
def test_stored_version_and_export_rebuild_the_untied_model(
    family: str, fill: str, store: CheckpointStore, tiny_tokenizer, tmp_path: Path
) -> None:
    model = BUILDERS[family](seed=4, tie_word_embeddings=True)
    base = store.import_model(model, tiny_tokenizer, reference=f"tiny-tied-{family}")
    config = AblateDirectionConfig(
        pairs=PAIRS_TEXT, layer=0, evaluate_perplexity=False, fill=fill, calibration_window=16
    )
    result = get_method("ablate_direction").run(model, tiny_tokenizer, config, context(tmp_path))
    version = store.commit(
        base.id,
        result.changed,
        operations=[config.model_dump(mode="json")],
        metrics=result.metrics,
        config_overrides=result.config_overrides,
    )
    ids = random_ids(9)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    loaded = load(version.id, store=store).model
    assert loaded.config.tie_word_embeddings is False
    assert loaded.lm_head.weight is not get_adapter(loaded).embed().weight
    folder = store.export(version.id, tmp_path / "export")
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    for rebuilt in (loaded, plain):
        with torch.no_grad():
            torch.testing.assert_close(rebuilt(input_ids=ids).logits, expected)
        # The held d-component survives the round trip: a bias, not a hook.
        if fill == "mean":
            assert getattr(rebuilt.config, "mlp_bias", True) is True
            assert get_adapter(rebuilt).mlp_out(0).bias is not None


def test_config_validation(tiny_llama) -> None:
    with pytest.raises(ValidationError, match="pairs: give one of pairs, pairs_file and dataset"):
        AblateDirectionConfig()
    with pytest.raises(ValidationError, match="dataset: give either dataset or pairs"):
        AblateDirectionConfig(dataset="winogender", pairs=PAIRS_TEXT)
    with pytest.raises(ValidationError, match="exactly one of pairs and pairs_file"):
        AblateDirectionConfig(pairs=PAIRS_TEXT, pairs_file="p.jsonl")
    with pytest.raises(ValidationError, match="at least 2"):
        AblateDirectionConfig(pairs=PAIRS_TEXT[:1])
    for bad in (
        {"holdout_fraction": 0.0},
        {"layer": -1},
        {"token": "first"},
        {"extra": 1},
        {"fill": "median"},
        {"calibration_windows": 0},
        {"calibration_window": 1},
    ):
        with pytest.raises(ValidationError):
            AblateDirectionConfig(dataset="winogender", **bad)
    with pytest.raises(ValidationError):
        AblateDirectionConfig(dataset="stereoset")
    with pytest.raises(ValueError, match=r"^layer: 2 is out of range, the model has 2 layers"):
        AblateDirectionConfig(dataset="winogender", layer=2).check_against(tiny_llama.config)
    AblateDirectionConfig(dataset="winogender", layer=1).check_against(tiny_llama.config)
    assert "perplexity_ratio" not in AblateDirectionConfig(pairs=PAIRS_TEXT).metric_names()


def test_winogender_pairs_and_orientation() -> None:
    pairs = load_winogender()
    assert len(pairs) == 240 and len({p.occupation for p in pairs}) == 60
    for pair in pairs:
        male, female = pair.male.split(), pair.female.split()
        assert len(male) == len(female)
        assert sum(a != b for a, b in zip(male, female, strict=True)) == 1
    stereo = winogender_stereo_pairs()
    by_occupation = {p.occupation: s for p, s in zip(pairs, stereo, strict=True)}
    nurse, engineer = by_occupation["nurse"], by_occupation["engineer"]
    assert " she " in f" {nurse.stereo} " or " her " in f" {nurse.stereo} "
    assert (
        " he " in f" {engineer.stereo} "
        or " his " in f" {engineer.stereo} "
        or (" him " in f" {engineer.stereo} ")
    )
