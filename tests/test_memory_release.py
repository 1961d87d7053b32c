"""Shape-changing and training operations on a warm model let go of what they no longer run
(issue 34): a structured prune lets go of each full-size layer as it replaces it, LoRA trains
over frozen projections cast once (the float32 ones let go meanwhile). The model is still put
back bit for bit, and the versions equal a fresh worker's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_editable, run_job, tiny_model
from peft import LoraConfig, PeftModel
from test_in_place import assert_same, snapshot, tensors_of, warm_model
from torch import nn

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.editing.lora.frozen import frozen_in, frozen_projection_weights
from modelsurgery.editing.lora.targets import target_paths
from modelsurgery.server.executor import WorkerSettings
from modelsurgery.server.in_place import InPlaceEdit
from modelsurgery.server.model_cache import ModelCache

PRUNE = {
    "method": "prune",
    "kind": "structured",
    "ratio": 0.25,
    "prune_heads": 1,
    "calibration_samples": 4,
    "calibration_seqlen": 32,
    "measure_latency": False,
    "evaluate_perplexity": False,
}


class BaseStore:
    """What the journal reads written tensors back from: a model's tensors as it was built,
    and the names read."""

    def __init__(self, model: nn.Module) -> None:
        self.tensors = {name: t.detach().clone() for name, t in model.state_dict().items()}
        self.reads: list[str] = []

    def read(self, name: str) -> torch.Tensor | None:
        self.reads.append(name)
        return self.tensors.get(name)

    def holds(self, model: nn.Module) -> bool:
        """Whether ``model`` is bit for bit what was stored."""
        state = model.state_dict()
        return state.keys() == self.tensors.keys() and all(
            t.dtype == self.tensors[n].dtype and torch.equal(t, self.tensors[n])
            for n, t in state.items()
        )


def fresh_worker(env: dict[str, Any], root: Path) -> dict[str, Any]:
    return {
        **env,
        "store": CheckpointStore(root / "store"),
        "cache": ModelCache(1 << 30),
        "settings": WorkerSettings(store_root=root / "store", cache_dir=root / "cache"),
    }


def test_a_structured_prune_lets_go_of_each_layer_as_it_replaces_it(
    job_env: dict[str, Any], tmp_path: Path
) -> None:
    """When layer 0 is pruned its full-size projections are already empty (read back from the
    store later), while layer 1's are still whole; the warm model comes back bit for bit and
    the version is a fresh worker's."""
    model = warm_model(job_env)
    before = snapshot(model)
    layers = model.model.layers
    full_size = [[p for p in layer.parameters() if p.dim() > 1] for layer in layers[:2]]
    seen: list[tuple[list[int], list[int]]] = []

    def emit(event: dict[str, Any]) -> None:
        if event.get("message") == "pruned layer 0":
            seen.append(([p.numel() for p in full_size[0]], [p.numel() for p in full_size[1]]))

    job = run_job(job_env, [PRUNE], emit=emit)
    assert job.state == "SUCCEEDED", job.error
    [(layer_0, layer_1)] = seen
    assert layer_0 == [0] * len(full_size[0])  # q, k, v, o and the MLP's three
    assert all(n > 0 for n in layer_1)
    assert all(p.numel() > 0 for p in full_size[0])  # put back
    assert_same(before, snapshot(model))

    fresh = fresh_worker(job_env, tmp_path / "fresh")
    again = run_job(fresh, [PRUNE])
    assert again.state == "SUCCEEDED", again.error
    assert tensors_of(job_env, job.version_id) == tensors_of(fresh, again.version_id)


def test_set_aside_lets_go_of_a_replaced_parameter_at_once() -> None:
    """Replaced and unwritten: emptied now, its put-back and the restore read it back; written
    before it was replaced, or unknown to the store: kept."""
    model = build_editable("llama")
    store = BaseStore(model)
    originals = store.tensors
    edit = InPlaceEdit(model, store.read)
    mlp, attn = model.model.layers[0].mlp, model.model.layers[0].self_attn
    up, down, q = mlp.up_proj.weight, mlp.down_proj.weight, attn.q_proj.weight
    with torch.no_grad():
        down.add_(1.0)
    edited = down.detach().clone()
    mlp.up_proj, mlp.down_proj = nn.Linear(4, 2, bias=False), nn.Linear(2, 4, bias=False)
    put_back = edit.set_aside(up)
    assert up.numel() == 0
    edit.set_aside(down)
    assert torch.equal(down, edited)
    put_back()
    assert torch.equal(up, originals["model.layers.0.mlp.up_proj.weight"])
    edit.set_aside(up)
    assert up.numel() == 0
    edit.set_aside(q)  # still in the model: the caller swaps its data (v*), not the journal
    assert q.numel() > 0
    edit.restore()
    assert mlp.up_proj.weight is up and mlp.down_proj.weight is down
    assert store.holds(model)

    lost = InPlaceEdit(model, lambda name: None)
    mlp.up_proj = nn.Linear(4, 2, bias=False)
    lost.set_aside(up)
    assert torch.equal(up, originals["model.layers.0.mlp.up_proj.weight"])


def lora_model(family: str) -> nn.Module:
    """A tiny model with a LoRA on every projection, B not zero (gradients reach A)."""
    model = tiny_model(family, seed=0)
    model.requires_grad_(False)
    config = LoraConfig(
        r=4,
        target_modules=target_paths(model, None, None),
        fan_in_fan_out=family == "gpt2",
        init_lora_weights=False,
    )
    torch.manual_seed(1)
    PeftModel(model, config)
    return model


def step(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One autocast bfloat16 training step's loss and LoRA gradients."""
    ids = torch.randint(4, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_frozen_projections_cast_once_train_bit_for_bit_as_autocast(family: str) -> None:
    """Training over the frozen projections cast ahead gives autocast's loss and gradients
    exactly; the weights come back in float32, unchanged."""
    model = lora_model(family)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, grads = step(model)
    with frozen_in(model, torch.bfloat16):
        frozen = frozen_projection_weights(model)
        assert frozen and all(w.dtype == torch.bfloat16 for w in frozen)
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        cast_loss, cast_grads = step(model)
    assert torch.equal(cast_loss, loss)
    assert cast_grads.keys() == grads.keys()
    assert all(torch.equal(cast_grads[n], g) for n, g in grads.items())
    for name, parameter in model.named_parameters():
        assert parameter.dtype == weights[name].dtype and torch.equal(parameter, weights[name])


def test_frozen_projections_come_back_from_the_store_on_a_warm_model() -> None:
    """With the journal's ``set_aside`` the float32 weights are let go while training runs and
    read back from the store after: nothing counts as written."""
    model = lora_model("llama")
    store = BaseStore(model)
    edit = InPlaceEdit(model, store.read)
    with frozen_in(model, torch.bfloat16, edit.set_aside):
        step(model)
    frozen = frozen_projection_weights(model)
    names = {n for n, p in model.named_parameters() if any(p is w for w in frozen)}
    assert set(store.reads) == names and len(names) == 7 * model.config.num_hidden_layers
    assert edit.written() == {}
    assert store.holds(model)
