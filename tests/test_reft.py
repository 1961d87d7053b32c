"""reft: intervention maths, positions, hooks under generation with a KV cache, artifacts
round trip, training, config validation and lineage rules, on tiny random models."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import SPECIAL_TOKENS, tiny_model, word_level_tokenizer
from pydantic import ValidationError
from safetensors.torch import load as safetensors_load
from tokenizers import Regex
from tokenizers.pre_tokenizers import Split
from transformers import DynamicCache, PreTrainedTokenizerFast

import modelsurgery.editing.reft  # noqa: F401  (registers the method)
from modelsurgery.editing.reft import (
    CONFIG_ARTIFACT,
    TENSORS_ARTIFACT,
    attach_from_folder,
    attach_interventions,
)
from modelsurgery.editing.reft.artifacts import to_artifacts
from modelsurgery.editing.reft.config import InterventionSpec, ReftConfig, parse_positions
from modelsurgery.editing.reft.hooks import attach
from modelsurgery.editing.reft.interventions import ReftInterventions
from modelsurgery.editing.reft.lora_count import lora_parameter_count
from modelsurgery.editing.reft.positions import prompt_positions, slot_positions
from modelsurgery.editing.registry import JobCancelled, MethodContext, get_method
from modelsurgery.models.decoding import past_length

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 128


# No pad id; GPT-2 never stops at an eos (its default, 50256, is outside VOCAB); Llama with
# larger initial weights: a 2-layer model at 0.02 can barely move its logits.
MODELS = {
    "llama": partial(tiny_model, "llama", pad_token_id=None, initializer_range=0.1),
    "gpt2": partial(tiny_model, "gpt2", pad_token_id=None, eos_token_id=None),
}
tiny_llama = MODELS["llama"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A real (tokenizers-backed) character-level tokenizer with 99 ids."""
    chars = [chr(c) for c in range(32, 127)]
    split = Split(Regex("."), behavior="isolated")
    return word_level_tokenizer([*SPECIAL_TOKENS.values(), *chars], split, **SPECIAL_TOKENS)


def spec_for(model: torch.nn.Module, **overrides: object) -> InterventionSpec:
    fields: dict[str, object] = {
        "intervention": "loreft",
        "layers": [0, 1],
        "rank": 4,
        "positions": "f1+l1",
        "share_weights": False,
        "hidden_size": model.config.hidden_size if hasattr(model.config, "hidden_size") else 64,
        "dtype": "float32",
        "model_type": model.config.model_type,
    }
    fields.update(overrides)
    return InterventionSpec(**fields)


def random_interventions(spec: InterventionSpec, scale: float = 0.5) -> ReftInterventions:
    """Trainable interventions with a clearly non-zero edit (random W and b)."""
    torch.manual_seed(1)
    interventions = ReftInterventions(spec, trainable=True)
    with torch.no_grad():
        for slots in interventions.layers.values():
            for module in slots.values():
                module.source.weight.normal_(0, scale)
                module.source.bias.normal_(0, scale)
    return interventions.eval()


def context(tmp_path: Path, **kwargs: object) -> MethodContext:
    return MethodContext(model_digest="test", cache_dir=tmp_path, **kwargs)


# Toy task: always answer "z" (one token, so the last prompt position alone decides it).
TOY_EXAMPLES = [
    {"prompt": "What is red?", "completion": "z"},
    {"prompt": "Name a city.", "completion": "z"},
    {"prompt": "2+2=", "completion": "z"},
    {"prompt": "Say hi", "completion": "z"},
]


def toy_config(**overrides: object) -> ReftConfig:
    fields: dict[str, object] = {
        "layers": [0, 1],
        "rank": 2,
        "examples": TOY_EXAMPLES,
        "epochs": 5,
        "lr": 5e-2,
        "batch_size": 2,
        "append_eos": False,
    }
    fields.update(overrides)
    return ReftConfig(**fields)


# --- positions ------------------------------------------------------------------------------
def test_positions_first_and_last_of_prompt() -> None:
    assert prompt_positions(5, 1, 1) == ([0], [4])
    assert slot_positions(5, 1, 1, share_weights=True) == {"all": [0, 4]}
    assert slot_positions(5, 1, 1, share_weights=False) == {"first": [0], "last": [4]}


def test_positions_overlap_is_split_at_half() -> None:
    # f3+l3 on 5 tokens would overlap; each side gets at most 5 // 2 = 2 tokens.
    assert prompt_positions(5, 3, 3) == ([0, 1], [3, 4])
    assert prompt_positions(6, 3, 3) == ([0, 1, 2], [3, 4, 5])


def test_positions_prompt_shorter_than_n() -> None:
    assert prompt_positions(2, 0, 3) == ([], [0, 1])
    assert prompt_positions(1, 2, 0) == ([0], [])
    assert prompt_positions(1, 2, 2) == ([], [])
    assert slot_positions(3, 4, 4, share_weights=True) == {"all": [0, 2]}


@pytest.mark.parametrize(
    ("spec", "expected"), [("f1+l1", (1, 1)), ("l3", (0, 3)), ("f2", (2, 0)), ("f0+l2", (0, 2))]
)
def test_parse_positions(spec: str, expected: tuple[int, int]) -> None:
    assert parse_positions(spec) == expected


@pytest.mark.parametrize("spec", ["", "l1+f1", "f1l1", "x2", "f+l1", "f0", "f1+", "f1+l1+l2"])
def test_parse_positions_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="positions"):
        parse_positions(spec)


# --- intervention maths ---------------------------------------------------------------------
def test_loreft_is_identity_when_w_equals_r_and_b_zero() -> None:
    model = tiny_llama()
    spec = spec_for(model, share_weights=True, positions="f2+l2")
    interventions = ReftInterventions(spec, trainable=True)
    with torch.no_grad():
        for slots in interventions.layers.values():
            for module in slots.values():
                module.source.weight.copy_(module.rotate.weight)
                module.source.bias.zero_()
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
        handle = attach(model, interventions)
        edited = model(ids).logits
        handle.remove()
    torch.testing.assert_close(edited, base, atol=1e-5, rtol=1e-5)


def test_loreft_matches_formula_at_chosen_positions_only() -> None:
    model = tiny_llama()
    spec = spec_for(model, layers=[1], positions="f1+l2", share_weights=False)
    interventions = random_interventions(spec)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    captured: dict[str, torch.Tensor] = {}
    layer = model.model.layers[1]
    with torch.no_grad():
        probe = layer.register_forward_hook(
            lambda m, a, out: captured.setdefault("h", out[0] if isinstance(out, tuple) else out)
        )
        model(ids)
        probe.remove()
        h = captured.pop("h")[0]
        handle = attach(model, interventions)
        probe = layer.register_forward_hook(
            lambda m, a, out: captured.setdefault("h", out[0] if isinstance(out, tuple) else out)
        )
        model(ids)
        probe.remove()
        handle.remove()
    edited = captured["h"][0]
    for position, slot in [(0, "first"), (4, "last"), (5, "last")]:
        module = interventions.at(1)[slot]
        r, w, b = module.rotate.weight, module.source.weight, module.source.bias
        expected = h[position] + r.T @ (w @ h[position] + b - r @ h[position])
        torch.testing.assert_close(edited[position], expected, atol=1e-5, rtol=1e-5)
    for position in (1, 2, 3):
        assert torch.equal(edited[position], h[position])


def test_rotation_stays_orthonormal_after_training(tmp_path: Path) -> None:
    # Weight decay is on: it must not reach the parametrised rotation.
    config = toy_config(rank=4, epochs=3, lr=0.1, weight_decay=0.1)
    result = get_method("reft").run(tiny_llama(), char_tokenizer(), config, context(tmp_path))
    tensors = safetensors_load(result.artifacts[TENSORS_ARTIFACT])
    rotations = [t for name, t in tensors.items() if name.endswith(".rotate")]
    assert len(rotations) == 4
    initial = ReftInterventions(spec_for(tiny_llama(), rank=4), trainable=True)
    for r in rotations:
        torch.testing.assert_close(r @ r.T, torch.eye(4), atol=1e-5, rtol=0)
    assert result.metrics["final_loss"] < result.metrics["initial_loss"]
    assert not torch.allclose(rotations[0], initial.at(0)["first"].rotate.weight.detach())


def test_direft_has_no_orthogonality_and_matches_formula() -> None:
    model = tiny_llama()
    spec = spec_for(model, intervention="direft", layers=[0], positions="l1")
    interventions = random_interventions(spec)
    module = interventions.at(0)["all"]
    assert not hasattr(module.proj, "parametrizations")
    h = torch.randn(3, 64)
    w2, w1, b = module.proj.weight, module.source.weight, module.source.bias
    torch.testing.assert_close(module.delta(h), (h @ w1.T + b) @ w2)


# --- hooks and generation -------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(MODELS))
def test_cached_generation_matches_no_cache_recompute(family: str) -> None:
    model = MODELS[family]()
    spec = spec_for(model, positions="f1+l1")
    handle = attach(model, random_interventions(spec))
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=3,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        prefill = model(prompt).logits[:, -1]
        torch.testing.assert_close(out.logits[0], prefill, atol=1e-5, rtol=1e-5)
        # Second new token: recompute without cache, intervening on the 5 prompt positions only.
        extended = out.sequences[:, :6]
        with handle.prompt_lengths([5]):
            recomputed = model(extended, use_cache=False).logits[:, -1]
        torch.testing.assert_close(out.logits[1], recomputed, atol=1e-5, rtol=1e-5)
        # Without the override, the same call treats all 6 tokens as prompt: different logits.
        assert not torch.allclose(model(extended).logits[:, -1], recomputed, atol=1e-4)
        handle.remove()
        plain = model(prompt).logits[:, -1]
    assert not torch.allclose(plain, prefill, atol=1e-4)


def test_past_length_reads_every_signal_a_call_carries() -> None:
    """Decoding steps are told apart from prompt calls however transformers names the cache
    (``past_key_values`` up to 5.23, ``cache`` from 5.24) or when only the mask shows it."""
    cache = DynamicCache()
    cache.update(torch.zeros(2, 2, 5, 8), torch.zeros(2, 2, 5, 8), 0)
    step = torch.ones(2, 1, dtype=torch.long)
    for keyword in ("past_key_values", "cache"):
        assert past_length((step,), {keyword: cache}) == 5
        assert past_length((), {"input_ids": step, keyword: DynamicCache()}) == 0
    wide = torch.ones(2, 7, dtype=torch.long)
    assert past_length((), {"input_ids": step, "attention_mask": wide}) == 6
    assert past_length((), {"input_ids": wide, "attention_mask": wide}) == 0
    assert past_length((), {"input_ids": step, "cache_position": torch.tensor([4])}) == 4


def test_left_padded_batch_matches_single_prompts() -> None:
    model = tiny_llama()
    handle = attach(model, random_interventions(spec_for(model, positions="f2+l1")))
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, VOCAB, (n,), generator=gen) for n in (6, 4)]
    singles = []
    with torch.no_grad():
        for p in prompts:
            out = model.generate(
                p[None],
                max_new_tokens=4,
                do_sample=False,
                pad_token_id=0,
                attention_mask=torch.ones(1, p.numel(), dtype=torch.long),
            )
            singles.append(out[0, p.numel() :])
        ids = torch.zeros(2, 6, dtype=torch.long)
        mask = torch.zeros(2, 6, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, 6 - p.numel() :] = p
            mask[b, 6 - p.numel() :] = 1
        batched = model.generate(
            ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0
        )
    handle.remove()
    for b in range(2):
        assert torch.equal(batched[b, 6:], singles[b])


def test_mask_with_holes_is_refused() -> None:
    model = tiny_llama()
    handle = attach(model, random_interventions(spec_for(model)))
    ids = torch.randint(0, VOCAB, (1, 5))
    with pytest.raises(ValueError, match="holes"):
        model(ids, attention_mask=torch.tensor([[1, 0, 1, 1, 1]]))
    handle.remove()


def test_remove_detaches_all_hooks() -> None:
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
        handle = attach(model, random_interventions(spec_for(model)))
        assert not torch.allclose(model(ids).logits, base)
        handle.remove()
        assert torch.equal(model(ids).logits, base)


# --- artifacts ------------------------------------------------------------------------------
@pytest.mark.parametrize("intervention", ["loreft", "direft"])
def test_artifacts_round_trip_gives_identical_outputs(intervention: str, tmp_path: Path) -> None:
    model = tiny_llama()
    interventions = random_interventions(spec_for(model, intervention=intervention))
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        handle = attach(model, interventions)
        live = model(ids).logits
        handle.remove()
        artifacts = to_artifacts(interventions)
        assert set(artifacts) == {CONFIG_ARTIFACT, TENSORS_ARTIFACT}
        assert json.loads(artifacts[CONFIG_ARTIFACT])["intervention"] == intervention
        handle = attach_interventions(model, artifacts)
        loaded = model(ids).logits
        handle.remove()
        for name, data in artifacts.items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(data)
        handle = attach_from_folder(model, tmp_path)
        from_folder = model(ids).logits
        handle.remove()
    assert torch.equal(loaded, live)
    assert torch.equal(from_folder, loaded)


def test_attach_refuses_mismatched_model() -> None:
    artifacts = to_artifacts(random_interventions(spec_for(tiny_llama(), layers=[1])))
    spec = json.loads(artifacts[CONFIG_ARTIFACT])
    spec["layers"] = [5]
    with pytest.raises(ValueError, match="do not match"):
        attach_interventions(tiny_llama(), {**artifacts, CONFIG_ARTIFACT: json.dumps(spec)})
    with pytest.raises(FileNotFoundError, match="missing"):
        attach_from_folder(tiny_llama(), Path("/nonexistent"))


# --- the method -----------------------------------------------------------------------------
def test_run_trains_and_returns_artifacts_only(tmp_path: Path) -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    events: list[dict] = []
    method = get_method("reft")
    result = method.run(
        model, char_tokenizer(), toy_config(), context(tmp_path, report=events.append)
    )
    assert result.changed == {}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    assert set(result.artifacts) == {CONFIG_ARTIFACT, TENSORS_ARTIFACT}
    m = result.metrics
    assert m["final_loss"] < 0.5 * m["initial_loss"]
    # Rank 2, untied f1+l1 on 2 layers: 4 interventions of R, W (2 x 64 each) and b (2).
    assert m["trainable_parameters"] == 4 * (2 * 64 * 2 + 2)
    assert (
        m["parameter_ratio_vs_lora"] == m["trainable_parameters"] / m["lora_parameters_same_rank"]
    )
    train_events = [e for e in events if e["message"] == "train"]
    assert [e["step"] for e in train_events] == list(range(1, 11))
    assert all(e["total"] == 10 and e["loss"] > 0 for e in train_events)
    # The saved interventions reproduce the effect: the completion becomes likely.
    tok = char_tokenizer()
    handle = attach_interventions(model, result.artifacts)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([tok("Say hi").input_ids]),
            max_new_tokens=1,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    handle.remove()
    assert tok.decode(out[0, 6:]) == "z"


def test_run_is_seeded(tmp_path: Path) -> None:
    run = get_method("reft").run
    first = run(tiny_llama(), char_tokenizer(), toy_config(epochs=2), context(tmp_path))
    second = run(tiny_llama(), char_tokenizer(), toy_config(epochs=2), context(tmp_path))
    assert first.artifacts == second.artifacts


def test_lora_count_matches_peft_formula() -> None:
    model = tiny_llama()
    rank = 4
    # q 64->64, k 64->32, v 64->32, o 64->64, gate/up 64->128, down 128->64, per layer.
    shapes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    assert lora_parameter_count(model.config, [1], rank) == sum(rank * (i + o) for i, o in shapes)
    assert lora_parameter_count(model.config, [0, 1], rank) == 2 * sum(
        rank * (i + o) for i, o in shapes
    )


def test_cancellation_between_steps(tmp_path: Path) -> None:
    steps: list[int] = []
    ctx = context(
        tmp_path,
        report=lambda e: steps.append(e["step"]),
        is_cancelled=lambda: len(steps) >= 2,
    )
    with pytest.raises(JobCancelled):
        get_method("reft").run(tiny_llama(), char_tokenizer(), toy_config(), ctx)
    assert steps == [1, 2]


def test_examples_file_must_be_under_data_roots(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    lines = "\n".join(json.dumps(e) for e in TOY_EXAMPLES)
    (root / "toy.jsonl").write_text(lines + "\n", encoding="utf-8")
    (tmp_path / "outside.jsonl").write_text(lines, encoding="utf-8")
    run = get_method("reft").run
    ctx = context(tmp_path, data_roots=(root,))
    base = {"examples": None, "epochs": 1}
    result = run(tiny_llama(), char_tokenizer(), toy_config(**base, examples_file="toy.jsonl"), ctx)
    assert result.metrics["train_steps"] == 2
    for path in (str(tmp_path / "outside.jsonl"), "../outside.jsonl", "missing.jsonl"):
        with pytest.raises(ValueError, match=r"^examples_file"):
            run(tiny_llama(), char_tokenizer(), toy_config(**base, examples_file=path), ctx)
    (root / "bad.jsonl").write_text('{"prompt": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"^examples_file: line 1"):
        run(tiny_llama(), char_tokenizer(), toy_config(**base, examples_file="bad.jsonl"), ctx)


# --- config and lineage ---------------------------------------------------------------------
def test_config_validation() -> None:
    config = get_method("reft").config_class
    with pytest.raises(ValidationError, match="exactly one"):
        config(layers=[0])
    with pytest.raises(ValidationError, match="extra"):
        config(layers=[0], examples=TOY_EXAMPLES, bogus=1)
    with pytest.raises(ValidationError, match="listed twice"):
        config(layers=[1, 1], examples=TOY_EXAMPLES)
    with pytest.raises(ValidationError, match="positions"):
        config(layers=[0], examples=TOY_EXAMPLES, positions="middle")
    model_config = tiny_llama().config
    with pytest.raises(ValueError, match=r"^layers\[1\]: layer 2 out of range"):
        config(layers=[0, 2], examples=TOY_EXAMPLES).check_against(model_config)
    with pytest.raises(ValueError, match=r"^rank"):
        config(layers=[0], rank=65, examples=TOY_EXAMPLES).check_against(model_config)


def test_bfloat16_model_trains_and_stores_bfloat16(tmp_path: Path) -> None:
    model = tiny_llama().to(torch.bfloat16)
    result = get_method("reft").run(model, char_tokenizer(), toy_config(), context(tmp_path))
    assert result.metrics["final_loss"] < 0.5 * result.metrics["initial_loss"]
    assert json.loads(result.artifacts[CONFIG_ARTIFACT])["dtype"] == "bfloat16"
    tensors = safetensors_load(result.artifacts[TENSORS_ARTIFACT])
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    handle = attach_interventions(model, result.artifacts)
    with torch.no_grad():
        logits = model(torch.tensor([char_tokenizer()("Say hi").input_ids])).logits
    handle.remove()
    assert logits.dtype == torch.bfloat16
    assert int(logits[0, -1].argmax()) == char_tokenizer().convert_tokens_to_ids("z")
