"""A worker's model placed over several devices (issue 34): the device map, and every method
family run on a model split over two devices.

This machine has no second device, so the jobs run under ``VirtualDevices`` (two labelled
devices in CPU memory that refuse mixed-device operations as CUDA does): a method that computes
with tensors from two layers' devices fails here as it would on two GPUs. Each job's version must
equal the one the same job gives on one device, and the warm model must come back as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_editable, build_tiny_tokenizer, run_job
from test_concepts import job_operation, write_examples
from test_in_place import (
    FACTS,
    OPERATIONS,
    PAIRS,
    QUICK,
    assert_same,
    snapshot,
    tensors_of,
    warm_model,
)
from virtual_devices import VirtualDevices

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.editing.attachments import attach_hooks, stored_hook_artifacts
from modelsurgery.models import loading
from modelsurgery.models.placement import Placement, PlacementError, device_map, on_gpus, place
from modelsurgery.server.concepts import concept_predictions
from modelsurgery.server.executor import WorkerSettings, load_base
from modelsurgery.server.generation import generate_text
from modelsurgery.server.model_cache import ModelCache

TWO = ("ve:0", "ve:1")
# Beside test_in_place's operations: methods whose layers fall on both devices of the split
# (layers 0-1 on the first, 2-3 on the second).
ACROSS: dict[str, dict[str, Any]] = {
    "memit": {"method": "memit", "facts": FACTS, "layers": [1, 2], **QUICK},
    "ultraedit": {"method": "ultraedit", "facts": FACTS, "layers": [1, 2], "lr": 0.01},
    "mask_heads": {"method": "mask_heads", "heads": ["0.1", "3.1"]},
    "prune-2:4": {
        "method": "prune",
        "kind": "nm",
        "calibration_samples": 4,
        "calibration_seqlen": 32,
        "measure_latency": False,
        "evaluate_perplexity": False,
    },
    "iti": {"method": "iti", "pairs": PAIRS * 2, "top_k": 2, "layers": [0, 3]},
    "ablate_direction": {"method": "ablate_direction", "pairs": PAIRS * 2, "layer": 2},
    "concept_bottleneck": job_operation(3),
}


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def split_over_two(model: torch.nn.Module) -> Placement:
    """Two devices, each with room for three quarters of the weights: the model fits neither
    alone (accelerate keeps room for the largest block on each, so less would not do)."""
    share = int(weight_bytes(model) * 0.75)
    return Placement(devices=TWO, max_memory=(share, share))


def test_a_model_that_fits_the_first_device_stays_whole_on_it() -> None:
    model = build_editable("llama")
    roomy = Placement(devices=TWO, max_memory=(10 * weight_bytes(model),) * 2)
    assert device_map(model, roomy) == {"": "ve:0"}
    assert device_map(model, Placement()) == {"": "cpu"}


def test_a_model_too_big_for_one_device_is_split_by_whole_blocks_in_order() -> None:
    model = build_editable("llama")
    mapping = device_map(model, split_over_two(model))
    assert set(mapping.values()) == set(TWO)
    order = [TWO.index(mapping[name]) for name in mapping]
    assert order == sorted(order), mapping  # filled in order: no device revisited
    for name in mapping:  # whole decoder blocks, never a projection alone
        assert "." not in name.removeprefix("model.layers.") or name.count(".") <= 2


def test_a_model_that_fits_nowhere_is_refused_unless_cpu_offload() -> None:
    model = build_editable("llama")
    small = int(weight_bytes(model) * 0.3)
    with pytest.raises(PlacementError, match="does not fit the worker's 2 device"):
        device_map(model, Placement(devices=TWO, max_memory=(small, small)))
    offloaded = Placement(devices=TWO, max_memory=(small, small), cpu_offload=True)
    mapping = device_map(model, offloaded)
    assert "cpu" in mapping.values() and "ve:0" in mapping.values()


def test_a_placed_model_computes_what_it_did_on_one_device() -> None:
    model = build_editable("llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    expected = model(ids).logits
    with VirtualDevices():
        mapping = place(model, split_over_two(model))
        logits = model(ids.to("ve:0")).logits
        assert {p.device for p in model.parameters()} == {torch.device(d) for d in TWO}
        assert logits.device == torch.device("ve:0")
        assert torch.equal(logits.cpu(), expected)
    assert model.hf_device_map == mapping


def test_mixed_devices_are_refused_as_on_two_gpus() -> None:
    """The check the job tests below rely on."""
    with VirtualDevices():
        a = torch.ones(3, device="ve:0")
        b = torch.ones(3, device="ve:1")
        with pytest.raises(RuntimeError, match="same device"):
            _ = a + b
        assert torch.equal((a + b.to(a.device)).cpu(), torch.full((3,), 2.0))


def worker_env(env: dict[str, Any], root: Path, placement: Placement) -> dict[str, Any]:
    return {
        **env,
        "store": CheckpointStore(root / "store"),
        "cache": ModelCache(1 << 30),
        "settings": WorkerSettings(
            store_root=root / "store",
            cache_dir=root / "cache",
            data_roots=(env["folder"].parent / "data",),
            placement=placement,
        ),
    }


@pytest.fixture
def devices(job_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Two virtual devices for the test, the env's data folder holding the concept examples.
    transformers' loader runs plain (it builds on the meta device in ways the mode does not
    follow); what is tested starts once a loaded model is placed."""
    write_examples(job_env["folder"].parent / "data")
    with VirtualDevices() as mode:
        monkeypatch.setattr(loading, "_load_weights", mode.plain(loading._load_weights))
        yield


@pytest.mark.parametrize("case", sorted({**OPERATIONS, **ACROSS}))
def test_a_job_on_a_model_split_over_two_devices_gives_the_one_device_version(
    case: str, job_env: dict[str, Any], tmp_path: Path, devices: None
) -> None:
    """The version equals the one-device job's, bit for bit, and the warm split model is
    left as it was found."""
    operation = {**OPERATIONS, **ACROSS}[case]
    one = worker_env(job_env, tmp_path / "one", Placement(devices=("ve:0",)))
    alone = run_job(one, [operation])
    assert alone.state == "SUCCEEDED", alone.error

    two = worker_env(job_env, tmp_path / "two", split_over_two(build_editable("llama")))
    model = warm_model(two)
    assert len(set(model.hf_device_map.values())) == 2
    before = snapshot(model)
    split = run_job(two, [operation])
    assert split.state == "SUCCEEDED", split.error
    assert_same(before, snapshot(model))
    assert tensors_of(two, split.version_id) == tensors_of(one, alone.version_id)


def serve(env: dict[str, Any], version: str) -> tuple[list[str], list[dict[str, Any]]]:
    """What a worker serves from ``version``: greedy text from the warm model, and concept
    predictions with a correction and token attributions (its hooks attached meanwhile)."""
    base = load_base(version, env["store"], env["cache"], env["settings"])
    text = generate_text(base.model, base.tokenizer, ["the capital of france is"], max_new_tokens=4)
    artifacts = stored_hook_artifacts(env["store"], version)
    texts = ["bad city bad food", "good food"]
    with attach_hooks(base.model, artifacts):
        plain = concept_predictions(base.model, base.tokenizer, texts, None, True)
        corrected = [{"food": "Positive"}, {"food": "Negative"}]
        steered = concept_predictions(base.model, base.tokenizer, texts, corrected, False)
    return text, [*plain, *steered]


def test_generate_and_concept_predictions_on_a_split_model_match_one_device(
    job_env: dict[str, Any], tmp_path: Path, devices: None
) -> None:
    served = []
    for index, placement in enumerate(
        [Placement(devices=("ve:0",)), split_over_two(build_editable("llama"))]
    ):
        env = worker_env(job_env, tmp_path / str(index), placement)
        outcome = run_job(env, [job_operation(3)])
        assert outcome.state == "SUCCEEDED", outcome.error
        served.append(serve(env, outcome.version_id))
    assert served[1] == served[0]
    assert served[0][1][0]["explain"]["food"]  # attributions were computed


def test_a_tied_head_stays_with_its_embedding_and_v_star_reads_it(
    job_env: dict[str, Any], tmp_path: Path, devices: None
) -> None:
    """SmolLM2's head is its embedding table: placed whole on the first device, while the
    edited layer and the final norm sit on the second; ROME's v* reads logits across them."""
    with VirtualDevices().paused():
        tied = build_editable("llama")
        tied.config.tie_word_embeddings = True
        tied.tie_weights()
        folder = tmp_path / "tied"
        tied.save_pretrained(folder)
        build_tiny_tokenizer().save_pretrained(folder)
    env = {**job_env, "folder": folder}
    operation = {**OPERATIONS["rome"], "layer": 2}
    one = worker_env(env, tmp_path / "one", Placement(devices=("ve:0",)))
    alone = run_job(one, [operation])
    two = worker_env(env, tmp_path / "two", split_over_two(tied))
    model = warm_model(two)
    assert model.hf_device_map["lm_head"] == model.hf_device_map["model.embed_tokens"] == "ve:0"
    assert model.hf_device_map["model.layers.2"] == "ve:1"
    split = run_job(two, [operation])
    assert alone.state == split.state == "SUCCEEDED", (alone.error, split.error)
    assert tensors_of(two, split.version_id) == tensors_of(one, alone.version_id)


@pytest.mark.parametrize("case", ["memit", "prune-2:4", "lora-merged"])
def test_blocks_offloaded_to_the_cpu_run_there_and_give_the_same_version(
    case: str, job_env: dict[str, Any], tmp_path: Path, devices: None
) -> None:
    """One device with room for half the model, the rest resident in CPU memory: blocks on
    both sides are edited where they are."""
    operation = {**OPERATIONS, **ACROSS}[case]
    half = int(weight_bytes(build_editable("llama")) * 0.5)
    offloaded = Placement(devices=("ve:0",), max_memory=(half,), cpu_offload=True)
    one = worker_env(job_env, tmp_path / "one", Placement(devices=("ve:0",)))
    two = worker_env(job_env, tmp_path / "two", offloaded)
    assert {"ve:0", "cpu"} <= set(warm_model(two).hf_device_map.values())
    alone, split = run_job(one, [operation]), run_job(two, [operation])
    assert alone.state == split.state == "SUCCEEDED", (alone.error, split.error)
    assert tensors_of(two, split.version_id) == tensors_of(one, alone.version_id)


def test_serve_options_reach_the_worker_placement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``serve --gpus-per-worker 2 --gpu-memory-gib 20 --cpu-offload``: each worker asks Ray
    for two GPUs, and on them gives each 20 GiB of weights, the rest kept in CPU memory."""
    from typer.testing import CliRunner

    from modelsurgery.client.cli import app
    from modelsurgery.server import app as server_app

    seen: list[Any] = []
    monkeypatch.setattr(server_app, "run", lambda settings, **_: seen.append(settings))
    flags = ["--gpus-per-worker", "2", "--gpu-memory-gib", "20", "--cpu-offload"]
    result = CliRunner().invoke(app, ["serve", "--store", str(tmp_path), *flags])
    assert result.exit_code == 0, result.output
    (settings,) = seen
    assert (settings.gpus_per_worker, settings.cpu_offload) == (2.0, True)
    worker = on_gpus(Placement(cpu_offload=True, gpu_memory=settings.gpu_memory_bytes), 2)
    assert worker.devices == ("cuda:0", "cuda:1")
    assert worker.max_memory == (20 << 30, 20 << 30) and worker.budgets()["cpu"] > 0
