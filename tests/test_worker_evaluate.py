"""EvaluateVersion on the worker (issue 29): a version whose weights equal its reference's (a
hook version against its parent, a revert against what it restores) shares one warm model with
it, so the evaluation locks that model once (it once deadlocked, holding the lock every job on
that model waits for) and measures the reference with the version's hooks lifted; it stops
between forward passes once the server cancels its task, and the servicer cancels that task
when the caller goes away."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import ray
import torch
from conftest import bounded, build_tiny_tokenizer, tiny_model
from ray.exceptions import TaskCancelledError
from test_lora import FACT

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.editing.registry import MethodContext, get_method
from modelsurgery.editing.steer import SteerConfig
from modelsurgery.editing.stereotypes.metrics import bias_metrics, tokenize_pairs
from modelsurgery.editing.stereotypes.pairs import ContrastPair
from modelsurgery.evaluation.suite import PairCase, Suite
from modelsurgery.server import job_table as jt
from modelsurgery.server import worker as worker_module
from modelsurgery.server.checkpoint_service import CheckpointService
from modelsurgery.server.engine import EngineSettings, JobEngine
from modelsurgery.server.executor import WorkerSettings, load_base
from modelsurgery.server.exports import ExportCache
from modelsurgery.server.metrics import ServerMetrics
from modelsurgery.server.worker import EvaluationStopped, SurgeryWorker
from modelsurgery.v1 import checkpoints_pb2, checkpoints_pb2_grpc

# Bounds a regression (a deadlock) so the test fails instead of hanging; a tiny model's whole
# evaluation takes well under a second.
JOIN_SECONDS = 60.0

PAIRS = [
    PairCase(stereo="he is a doctor", anti="she is a doctor"),
    PairCase(stereo="she is a nurse", anti="he is a nurse"),
    PairCase(stereo="he plays football", anti="she plays football"),
]
SUITE = Suite.model_validate({"facts": [FACT], "pairs": [p.model_dump() for p in PAIRS]})
STEER = SteerConfig.model_validate(
    {
        "pairs": [
            {"positive": "good big new", "negative": "bad small old"},
            {"positive": "good red", "negative": "bad blue"},
            {"positive": "new city", "negative": "old city"},
        ],
        "layers": [0],
        "coefficient": 8.0,
        "holdout_fraction": 0.0,
        "evaluate_perplexity": False,
    }
)


def mistral() -> torch.nn.Module:
    """Mistral has no MLP output bias, so steering it stays a hook (no weights change)."""
    return tiny_model("mistral", max_position_embeddings=2048, initializer_range=0.1)


@pytest.fixture
def worker(job_env: dict[str, Any]) -> SurgeryWorker:
    return SurgeryWorker(job_env["settings"], num_threads=1)


@pytest.fixture
def hook_version(worker: SurgeryWorker, tmp_path: Path) -> tuple[str, str]:
    """(the base version, a steering hook version on it: same weights, vectors as hooks)."""
    model, tokenizer = mistral(), build_tiny_tokenizer()
    base = worker.store.import_model(model, tokenizer, reference="tiny-mistral")
    context = MethodContext(model_digest="test", cache_dir=tmp_path / "steer")
    result = get_method("steer").run(model, tokenizer, STEER, context)
    assert not result.changed and result.artifacts
    version = worker.store.commit(
        base.id, {}, operations=[STEER.model_dump(mode="json")], artifacts=result.artifacts
    )
    return base.id, version.id


def test_a_hook_version_is_judged_against_its_parent_without_the_hooks_on_the_parent(
    worker: SurgeryWorker, hook_version: tuple[str, str]
) -> None:
    base, version = hook_version
    metrics = bounded(
        lambda: worker.evaluate(version, base, SUITE.to_bytes(), True)[0],
        JOIN_SECONDS,
        "evaluate (a deadlock?)",
    )
    warm = load_base(base, worker.store, worker.cache, worker.settings)
    assert warm.model is load_base(version, worker.store, worker.cache, worker.settings).model
    assert warm.lock.acquire(blocking=False), "the warm model's lock was left held"
    warm.lock.release()

    plain, tokenizer = mistral(), build_tiny_tokenizer()
    contrast = tokenize_pairs(tokenizer, [ContrastPair(p.stereo, p.anti) for p in PAIRS])
    with torch.no_grad():
        assert metrics["bias_gap_base"] == pytest.approx(bias_metrics(plain, contrast)["bias_gap"])
    assert metrics["bias_gap"] != pytest.approx(metrics["bias_gap_base"])
    assert metrics["perplexity"] != pytest.approx(metrics["perplexity_base"])
    assert metrics["probability_gain"] != pytest.approx(0.0, abs=1e-9)
    # The hooks came off the shared model when the evaluation ended.
    again = bounded(
        lambda: worker.evaluate(base, base, SUITE.to_bytes(), True)[0],
        JOIN_SECONDS,
        "evaluate (a deadlock?)",
    )
    for name in ("bias_gap", "stereotype_share", "perplexity"):
        assert again[name] == again[f"{name}_base"] == metrics[f"{name}_base"], name


def test_a_revert_is_judged_against_the_version_it_restores(
    worker: SurgeryWorker, job_env: dict[str, Any]
) -> None:
    store: CheckpointStore = worker.store
    base = load_base(str(job_env["folder"]), store, worker.cache, worker.settings).version_id
    name = "model.layers.0.mlp.down_proj.weight"
    edited = store.commit(
        base, {name: store.tensor(base, name) * 2}, operations=[{"method": "double"}]
    )
    reverted = store.revert(edited.id)
    metrics = bounded(
        lambda: worker.evaluate(reverted.id, base, SUITE.to_bytes(), True)[0],
        JOIN_SECONDS,
        "evaluate (a deadlock?)",
    )
    assert metrics["perplexity_ratio"] == 1.0
    assert metrics["probability_gain"] == 0.0 and metrics["locality"] == 1.0


def test_a_cancelled_evaluation_stops_and_leaves_the_warm_model_as_it_was(
    worker: SurgeryWorker, hook_version: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server cancels the Ray task (its caller went away): the worker stops at the next
    forward pass, and the shared model's hooks and lock are released."""
    base, version = hook_version
    checks: list[int] = []

    def cancelled_after_two_checks() -> bool:
        checks.append(1)
        return len(checks) > 2

    monkeypatch.setattr(worker_module, "_task_cancelled", cancelled_after_two_checks)
    with pytest.raises(EvaluationStopped):
        bounded(
            lambda: worker.evaluate(version, base, SUITE.to_bytes(), True)[0],
            JOIN_SECONDS,
            "evaluate (a deadlock?)",
        )
    assert len(checks) == 3

    monkeypatch.setattr(worker_module, "_task_cancelled", lambda: False)
    warm = load_base(base, worker.store, worker.cache, worker.settings)
    assert warm.lock.acquire(blocking=False)
    warm.lock.release()
    metrics = bounded(
        lambda: worker.evaluate(base, base, SUITE.to_bytes(), True)[0],
        JOIN_SECONDS,
        "evaluate (a deadlock?)",
    )
    assert metrics["perplexity_ratio"] == 1.0 and metrics["probability_gain"] == 0.0


class _NeverAnswers:
    """A worker actor whose ``evaluate`` task never finishes (``evaluate.remote`` returns a
    future standing in for the Ray object ref)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.refs: list[asyncio.Future[Any]] = []
        self.evaluate = self

    def remote(self, *args: Any) -> asyncio.Future[Any]:
        self.refs.append(asyncio.get_running_loop().create_future())
        self.started.set()
        return self.refs[-1]


def test_the_servicer_cancels_the_evaluation_when_its_caller_leaves(
    store: CheckpointStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = store.import_model(tiny_model("llama"), build_tiny_tokenizer(), reference="t").id

    async def scenario() -> tuple[list[Any], list[Any]]:
        cancelled: list[Any] = []
        asked = asyncio.Event()

        def cancel(ref: Any, **_: Any) -> None:
            cancelled.append(ref)
            asked.set()

        monkeypatch.setattr(ray, "cancel", cancel)
        table = jt.JobTable(tmp_path / "jobs.sqlite3")
        metrics = ServerMetrics(table)
        settings = WorkerSettings(store_root=store.root, cache_dir=tmp_path / "cache")
        engine = JobEngine(table, EngineSettings(worker=settings), metrics)
        actor = _NeverAnswers()
        engine.pool.actors.append(actor)
        service = CheckpointService(
            store, engine, ExportCache(tmp_path / "exports", store), model_roots=None
        )
        server = grpc.aio.server()
        checkpoints_pb2_grpc.add_CheckpointServiceServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = checkpoints_pb2_grpc.CheckpointServiceStub(channel)
                call = stub.EvaluateVersion(
                    checkpoints_pb2.EvaluateVersionRequest(ref=version, against=version)
                )
                await asyncio.wait_for(actor.started.wait(), JOIN_SECONDS)
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
                # Bounded so that a servicer that never cancels fails instead of hanging.
                await asyncio.wait_for(asked.wait(), JOIN_SECONDS)
        finally:
            await server.stop(None)
            metrics.close()
            table.close()
        return cancelled, actor.refs

    cancelled, refs = asyncio.run(scenario())
    assert cancelled == refs and len(refs) == 1


@pytest.mark.e2e
def test_a_cancelled_evaluation_stops_on_the_ray_worker(
    store: CheckpointStore, tmp_path: Path
) -> None:
    """What the servicer does when the caller goes away (``ray.cancel`` of the task): the
    threaded actor's evaluation stops at its next forward pass and releases the warm model,
    so the next evaluation on that model runs (it waits for the lock until then)."""
    version = store.import_model(tiny_model("llama"), build_tiny_tokenizer(), reference="t").id
    many = Suite.model_validate({"facts": [{**FACT, "case_id": i} for i in range(20_000)]})
    settings = WorkerSettings(store_root=store.root, cache_dir=tmp_path / "cache")
    ray.init(address="local", num_cpus=1, include_dashboard=False, configure_logging=False)
    try:
        actor = ray.remote(SurgeryWorker).options(max_concurrency=4).remote(settings, 1)
        ray.get(actor.evaluate.remote(version, version, SUITE.to_bytes(), False))
        long = actor.evaluate.remote(version, version, many.to_bytes(), False)
        time.sleep(2.0)
        ray.cancel(long)
        with pytest.raises((TaskCancelledError, EvaluationStopped)):
            ray.get(long, timeout=JOIN_SECONDS)
        assert ray.get(actor.evaluate.remote(version, version, SUITE.to_bytes(), False))
    finally:
        ray.shutdown()
