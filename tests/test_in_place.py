"""Jobs edit the warm model in place and put it back (issue 34): the weights are held once, and a
job on a warm model gives the same version as one on a fresh worker, after a succeeded, failed or
cancelled job alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_editable, run_job
from torch import nn

from modelsurgery.editing.registry import JobCancelled, SurgeryResult
from modelsurgery.evaluation.metrics import EvaluationSettings
from modelsurgery.evaluation.perplexity import wikitext_perplexity
from modelsurgery.models import load
from modelsurgery.server import executor
from modelsurgery.server.executor import WorkerSettings, execute_job, load_base
from modelsurgery.server.in_place import InPlaceEdit
from modelsurgery.server.model_cache import CachedModel, ModelCache

FACTS = [{"prompt": "the capital of {} is", "subject": "france", "target_new": "rome"}]
QUICK = {"v_steps": 3, "stats_samples": 16, "stats_window": 32, "evaluate_perplexity": False}
PAIRS = [
    {"positive": "good big new", "negative": "bad small old"},
    {"positive": "the new city", "negative": "the old city"},
]
OPERATIONS: dict[str, dict[str, Any]] = {
    "rome": {"method": "rome", "facts": FACTS, **QUICK},
    # v* in bfloat16 lets go of the float32 layers it casts (read back from the store after);
    # the second fact's v* runs after the first wrote its layer, which is kept instead.
    "rome-bf16-vstar": {
        "method": "rome",
        "facts": [*FACTS, {**FACTS[0], "subject": "spain", "target_new": "paris"}],
        "vstar_dtype": "bfloat16",
        **QUICK,
    },
    "prune-structured": {
        "method": "prune",
        "kind": "structured",
        "ratio": 0.25,
        "calibration_samples": 4,
        "calibration_seqlen": 32,
        "measure_latency": False,
        "evaluate_perplexity": False,
    },
    "steer-baked": {"method": "steer", "pairs": PAIRS, "coefficient": 4.0},
    "lora-merged": {"method": "lora", "facts": FACTS, "epochs": 1},
    "reft": {
        "method": "reft",
        "layers": [0],
        "examples": [{"prompt": "the capital of france is", "completion": " rome"}],
        "epochs": 2,
    },
}


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """Values of every tensor, the config and the count of hooks: what a job must leave."""
    tensors = {name: t.detach().clone() for name, t in model.state_dict().items()}
    hooks = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs)
        for m in model.modules()
    )
    return tensors, model.config.to_dict(), hooks


def assert_same(before: tuple[Any, ...], after: tuple[Any, ...]) -> None:
    assert before[0].keys() == after[0].keys()
    for name, tensor in before[0].items():
        assert after[0][name].dtype == tensor.dtype and torch.equal(after[0][name], tensor), name
    assert before[1] == after[1]
    assert before[2] == after[2]


def warm(env: dict[str, Any]) -> CachedModel:
    return load_base(str(env["folder"]), env["store"], env["cache"], env["settings"])


def warm_model(env: dict[str, Any]) -> nn.Module:
    return warm(env).model


def tensors_of(env: dict[str, Any], version_id: str) -> dict[str, str]:
    return {name: e.tensor_digest for name, e in env["store"].tensor_entries(version_id).items()}


@pytest.mark.parametrize("case", sorted(OPERATIONS))
def test_a_job_leaves_the_warm_model_as_it_found_it(
    case: str, job_env: dict[str, Any], tmp_path: Path
) -> None:
    """Two jobs in a row on one warm model: the model is bit-identical after each, and both
    give the version a fresh worker gives."""
    before = snapshot(warm_model(job_env))
    first = run_job(job_env, [OPERATIONS[case]])
    assert first.state == "SUCCEEDED", first.error
    assert_same(before, snapshot(warm_model(job_env)))
    second = run_job(job_env, [OPERATIONS[case]])
    assert second.state == "SUCCEEDED", second.error
    assert_same(before, snapshot(warm_model(job_env)))

    fresh = {
        **job_env,
        "cache": ModelCache(1 << 30),
        "settings": WorkerSettings(store_root=tmp_path / "store2", cache_dir=tmp_path / "c2"),
    }
    fresh["store"] = type(job_env["store"])(tmp_path / "store2")
    third = run_job(fresh, [OPERATIONS[case]])
    assert third.state == "SUCCEEDED", third.error
    expected = tensors_of(fresh, third.version_id)
    assert tensors_of(job_env, first.version_id) == expected
    assert tensors_of(job_env, second.version_id) == expected


def test_the_judge_reads_the_base_while_the_job_holds_its_edits(job_env: dict[str, Any]) -> None:
    """The base perplexity a job measures only when judging (a gate asks, no operation does)
    is the unedited model's, though the job's edits live on that same model meanwhile."""
    heads = [f"{layer}.{head}" for layer in range(2) for head in range(2)]
    job = run_job(
        job_env,
        [{"method": "mask_heads", "heads": heads}],
        gates={"perplexity_ratio": "<= 100"},
    )
    assert job.state == "SUCCEEDED", job.error
    settings = EvaluationSettings()
    fresh = load(str(job_env["folder"]))
    base = wikitext_perplexity(
        fresh.model, fresh.tokenizer, max_tokens=settings.perplexity_tokens, window=settings.window
    )
    assert job.metrics["perplexity_base"] == pytest.approx(base, rel=1e-6)
    assert job.metrics["perplexity"] != pytest.approx(base, rel=1e-3)


def test_a_cancelled_job_leaves_no_edit(job_env: dict[str, Any]) -> None:
    """Cancelled after its first operation wrote: that write is put back too."""
    before = snapshot(warm_model(job_env))
    cancelled = False

    def emit(event: dict[str, Any]) -> None:
        nonlocal cancelled
        cancelled = cancelled or event.get("message") == "running mask_heads"

    outcome = execute_job(
        {
            "base": str(job_env["folder"]),
            "operations": [OPERATIONS["rome"], {"method": "mask_heads", "heads": ["1.0"]}],
        },
        store=job_env["store"],
        cache=job_env["cache"],
        settings=job_env["settings"],
        emit=emit,
        is_cancelled=lambda: cancelled,
    )
    assert outcome.state == "CANCELLED"
    assert_same(before, snapshot(warm_model(job_env)))


class _Vandal:
    """A method that changes the model every way a method can, then fails mid-run."""

    def __init__(self, failure: BaseException) -> None:
        self.failure = failure

    def run(self, model: nn.Module, tokenizer: Any, config: Any, context: Any) -> SurgeryResult:
        layer = model.model.layers[0]
        with torch.no_grad():
            layer.mlp.down_proj.weight.add_(1.0)  # in place
            layer.self_attn.q_proj.weight.data = torch.zeros_like(layer.self_attn.q_proj.weight)
        layer.mlp.up_proj = nn.Linear(4, 4)  # a module replaced, another shape
        layer.self_attn.o_proj.bias = nn.Parameter(torch.ones(model.config.hidden_size))
        layer.register_forward_hook(lambda *args: None)
        model.config.intermediate_size = 7
        model.model.layers[1].mlp.gate_proj.weight.requires_grad_(False)
        model.train()
        raise self.failure


@pytest.mark.parametrize("failure", [RuntimeError("broke"), JobCancelled()])
def test_a_failed_operation_leaves_no_edit(
    failure: BaseException, job_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(warm_model(job_env))
    flags = {n: p.requires_grad for n, p in warm_model(job_env).named_parameters()}
    monkeypatch.setattr(executor, "get_method", lambda name: _Vandal(failure))
    if isinstance(failure, JobCancelled):
        assert run_job(job_env, [OPERATIONS["rome"]]).state == "CANCELLED"
    else:
        with pytest.raises(RuntimeError, match="broke"):
            run_job(job_env, [OPERATIONS["rome"]])
    model = warm_model(job_env)
    assert_same(before, snapshot(model))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training


def test_base_view_shows_the_base_and_gives_the_edits_back() -> None:
    model = build_editable("llama")
    originals = {name: t.detach().clone() for name, t in model.state_dict().items()}
    edit = InPlaceEdit(model, originals.get)
    weight = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        weight.mul_(2.0)
    edited = weight.detach().clone()
    model.model.layers[1].mlp.down_proj = nn.Linear(2, 3)
    with edit.base_view():
        assert torch.equal(weight, originals["model.layers.0.mlp.down_proj.weight"])
        assert model.model.layers[1].mlp.down_proj.weight.shape == (
            model.config.hidden_size,
            model.config.intermediate_size,
        )
    assert torch.equal(weight, edited)
    assert model.model.layers[1].mlp.down_proj.weight.shape == (3, 2)
    edit.restore()
    assert all(torch.equal(t, originals[n]) for n, t in model.state_dict().items())


def test_set_aside_lets_go_of_unwritten_tensors_and_keeps_written_ones() -> None:
    """v* in bfloat16 casts layers it runs: an unwritten float32 tensor is let go meanwhile and
    read back from the store, a written one is kept; neither counts as written afterwards
    unless it was before."""
    model = build_editable("llama")
    originals = {name: t.detach().clone() for name, t in model.state_dict().items()}
    reads: list[str] = []

    def read(name: str) -> torch.Tensor | None:
        reads.append(name)
        return originals.get(name)

    edit = InPlaceEdit(model, read)
    unwritten = model.model.layers[1].mlp.up_proj.weight
    written = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        written.add_(1.0)
    edited = written.detach().clone()
    put_back = [edit.set_aside(p) for p in (unwritten, written)]
    storage = unwritten.untyped_storage()
    for parameter in (unwritten, written):
        parameter.data = parameter.data.to(torch.bfloat16)
    assert reads == []
    for back in put_back:
        back()
    assert unwritten.untyped_storage().data_ptr() != storage.data_ptr()
    assert reads == ["model.layers.1.mlp.up_proj.weight"]
    assert unwritten.dtype == torch.float32
    assert torch.equal(unwritten, originals["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(written, edited)
    assert set(edit.written()) == {"model.layers.0.mlp.down_proj.weight"}


def test_replaced_layers_are_let_go_and_read_back() -> None:
    """A structured prune's full-size layers are not held beside the smaller ones: the
    journal frees them and reads them back from the store for the base view and the restore."""
    model = build_editable("llama")
    originals = {name: t.detach().clone() for name, t in model.state_dict().items()}
    edit = InPlaceEdit(model, originals.get)
    mlp = model.model.layers[0].mlp
    old = mlp.down_proj.weight
    mlp.down_proj = nn.Linear(2, model.config.hidden_size, bias=False)
    edit.let_go_of_replaced()
    assert old.numel() == 0
    with edit.base_view():
        assert torch.equal(mlp.down_proj.weight, originals["model.layers.0.mlp.down_proj.weight"])
    assert mlp.down_proj.weight.shape == (model.config.hidden_size, 2)
    assert old.numel() == 0
    edit.restore()
    assert mlp.down_proj.weight is old
    assert all(torch.equal(t, originals[n]) for n, t in model.state_dict().items())
    assert edit.written() == {}


def test_a_model_that_cannot_be_put_back_leaves_the_cache(job_env: dict[str, Any]) -> None:
    """A written tensor the store cannot give back: the warm model is dropped, not served."""
    model = warm_model(job_env)
    edit = InPlaceEdit(model, lambda name: None)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(1.0)
    executor._put_back(edit, warm(job_env), job_env["cache"])
    assert job_env["cache"].digests() == []
    assert warm_model(job_env) is not model
