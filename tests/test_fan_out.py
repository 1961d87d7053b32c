"""v* batches: grouped by length, reassembled in fact order whatever order they finish in,
and (e2e) spread over real Ray helper actors with the same result as in one process."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from conftest import build_tiny_tokenizer, tiny_model
from test_memit import FACTS
from test_rome import QUICK, context

from modelsurgery.editing import memit
from modelsurgery.editing.fan_out import run_here
from modelsurgery.editing.knowledge.config import family_defaults
from modelsurgery.editing.knowledge.facts import Fact
from modelsurgery.editing.knowledge.targets import length_batches, optimise_targets, tail_length
from modelsurgery.editing.registry import get_method
from modelsurgery.models.adapters import get_adapter
from modelsurgery.server.fan_out import RayFanOut

MORE_FACTS = [
    *FACTS,
    {"prompt": "{} was born in", "subject": "he", "target_new": "paris", "ground_truth": "rome"},
    {"prompt": "the language of {} is", "subject": "italy", "target_new": "french"},
    {"prompt": "{} is the capital of", "subject": "tokyo", "target_new": "italy"},
]


def memit_config(**extra: object) -> memit.MemitConfig:
    return memit.MemitConfig(
        facts=MORE_FACTS, layers=[0, 1], mom2_weight=0.01, fact_batch=2, **QUICK, **extra
    )


def reversed_fan_out(task, model, tokenizer, payloads, ctx):
    """Payloads finishing last-first, as helpers may return them."""
    results = list(run_here(task, model, tokenizer, payloads, ctx))
    yield from reversed(results)


def targets_with(fan_out, tmp_path: Path, model=None) -> torch.Tensor:
    model = model or tiny_model("llama", seed=3)
    tok = build_tiny_tokenizer()
    config = memit_config()
    defaults = family_defaults(get_adapter(model).model_type)
    ctx = context(tmp_path)
    ctx.fan_out = fan_out
    return optimise_targets(
        model,
        tok,
        config.facts,
        layer=1,
        site="layer",
        params=config.vstar_params(defaults, defaults.memit_clamp),
        templates=config.templates(),
        batch_size=config.fact_batch,
        dtype="float32",
        context=ctx,
    ).deltas


def test_batches_are_cut_from_facts_sorted_by_tail_length() -> None:
    tok = build_tiny_tokenizer()
    facts = [Fact.model_validate(f) for f in MORE_FACTS]
    batches = length_batches(tok, facts, 2)
    assert sorted(i for batch in batches for i in batch) == list(range(len(facts)))
    lengths = [tail_length(tok, facts[i]) for batch in batches for i in batch]
    assert lengths == sorted(lengths)
    assert [len(b) for b in batches] == [2, 2, 2]
    assert length_batches(tok, facts, 2) == batches


def test_results_return_to_their_facts_whatever_order_batches_finish(tmp_path: Path) -> None:
    in_order = targets_with(run_here, tmp_path)
    torch.testing.assert_close(targets_with(reversed_fan_out, tmp_path), in_order)
    assert (in_order.norm(dim=-1) > 0).all()


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def memit_weights(fan_out, tmp_path: Path, events: list) -> dict[str, torch.Tensor]:
    model, tok = tiny_model("llama", seed=3), build_tiny_tokenizer()
    ctx = context(tmp_path, events)
    ctx.fan_out = fan_out
    result = get_method("memit").run(model, tok, memit_config(vstar_dtype="float32"), ctx)
    return result.changed


@pytest.mark.e2e
def test_two_ray_helpers_give_the_single_worker_edit(local_ray, tmp_path: Path) -> None:
    """One MEMIT job's three v* batches on two helper actors holding the model: the solved
    update equals the one computed in one process."""
    here_events: list[dict] = []
    spread_events: list[dict] = []
    here = memit_weights(run_here, tmp_path, here_events)
    spread = memit_weights(RayFanOut(helpers=2), tmp_path, spread_events)
    assert here.keys() == spread.keys()
    for name in here:
        torch.testing.assert_close(spread[name], here[name], atol=1e-4, rtol=1e-4)
    assert {"message": "fan-out", "helpers": 2, "payloads": 3} in spread_events
    assert not any(e["message"] == "fan-out" for e in here_events)
    done = [e["step"] for e in spread_events if e["message"] == "v* targets"]
    assert done[-1] == len(MORE_FACTS)


@pytest.mark.e2e
def test_helpers_that_cannot_be_placed_leave_the_batches_here(local_ray, tmp_path: Path) -> None:
    model = tiny_model("llama", seed=3)
    unplaceable = RayFanOut(helpers=2, cpus_per_helper=64, start_timeout_s=2)
    torch.testing.assert_close(
        targets_with(unplaceable, tmp_path, copy.deepcopy(model)),
        targets_with(run_here, tmp_path, model),
    )


def test_a_model_placed_over_several_devices_runs_its_batches_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Helpers hold one device each, and a placed model fits none: no helper is started."""

    def no_helper(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a helper actor was started")

    monkeypatch.setattr(ray, "remote", no_helper)
    model = tiny_model("llama", seed=3)
    model.hf_device_map = {"model.layers.0": "cuda:0", "model.layers.1": "cuda:1"}
    ran = list(RayFanOut(helpers=4)(_double, model, None, [1, 2, 3], context(tmp_path, [])))
    assert ran == [(0, 2), (1, 4), (2, 6)]
    model.hf_device_map = {"model.layers.0": "cuda:0", "model.layers.1": "cuda:0"}
    with pytest.raises(AssertionError, match="helper actor was started"):
        list(RayFanOut(helpers=4)(_double, model, None, [1, 2, 3], context(tmp_path, [])))


def _double(model: Any, tokenizer: Any, payload: int, ctx: Any) -> int:
    return 2 * payload
