"""Generate within bounds (issue 17): prompts past the token (or character) bound are refused
naming ``prompts[i]`` before anything is generated; a generation stops at the next token once
its caller is gone or its deadline has passed; it runs on the warm model itself (issue 34: the
weights are held once) and gives the model's lock back when it stops, so a job never waits
behind an abandoned Generate past its deadline (one once made a 0.12 s job take 18.3 s)."""

from __future__ import annotations

import asyncio
import pickle
import time
from pathlib import Path

import grpc
import pytest
import ray
from conftest import build_tiny_tokenizer, greedy_text, tiny_model
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from ray.exceptions import TaskCancelledError
from transformers import GPT2Config, LlamaConfig

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.proto import limits
from modelsurgery.server import job_table as jt
from modelsurgery.server.checkpoint_service import CheckpointService
from modelsurgery.server.engine import EngineSettings, JobEngine
from modelsurgery.server.executor import WorkerSettings, load_base
from modelsurgery.server.exports import ExportCache
from modelsurgery.server.generation import (
    EmptyPromptError,
    GenerationStopped,
    PromptTooLongError,
    generate_text,
    prompt_token_limit,
)
from modelsurgery.server.metrics import ServerMetrics
from modelsurgery.server.worker import SurgeryWorker
from modelsurgery.v1 import checkpoints_pb2, checkpoints_pb2_grpc


@pytest.fixture
def version(store: CheckpointStore) -> str:
    return store.import_model(tiny_model("llama"), build_tiny_tokenizer(), reference="tiny").id


@pytest.fixture
def worker(store: CheckpointStore, tmp_path: Path) -> SurgeryWorker:
    return SurgeryWorker(WorkerSettings(store_root=store.root, cache_dir=tmp_path / "cache"), 1)


def test_the_prompt_bound_is_the_smaller_of_the_limit_and_the_positions() -> None:
    assert prompt_token_limit(LlamaConfig(max_position_embeddings=32768)) == 4096
    assert prompt_token_limit(GPT2Config(n_positions=128)) == 128


def test_a_long_prompt_is_refused_by_index_before_anything_is_generated() -> None:
    model, tokenizer = tiny_model("llama"), build_tiny_tokenizer()
    calls: list[int] = []

    def count() -> bool:
        calls.append(1)
        return False

    too_long = " ".join(["paris"] * 129)  # one token more than the model's 128 positions
    with pytest.raises(PromptTooLongError) as caught:
        generate_text(model, tokenizer, ["the city of", too_long], should_stop=count)
    assert caught.value.field == "prompts[1]"
    assert str(caught.value) == "prompts[1] has 129 tokens; this model takes at most 128"
    assert calls == []
    with pytest.raises(EmptyPromptError):
        generate_text(model, build_tiny_tokenizer(), [""])


def test_prompt_errors_keep_their_field_through_pickling() -> None:
    """Ray pickles a worker's error to the server, which answers with its field."""
    copied = pickle.loads(pickle.dumps(PromptTooLongError("prompts[3]", "has 9 tokens")))
    assert (copied.field, str(copied)) == ("prompts[3]", "prompts[3] has 9 tokens")


def test_generation_stops_at_the_next_token_once_told() -> None:
    model, tokenizer = tiny_model("llama"), build_tiny_tokenizer()
    polls: list[int] = []

    def after_four_tokens() -> bool:
        polls.append(1)
        return len(polls) > 4  # once before the prompt, then once per new token

    with pytest.raises(GenerationStopped):
        generate_text(
            model, tokenizer, ["the city of"], max_new_tokens=512, should_stop=after_four_tokens
        )
    assert len(polls) == 5


def test_worker_generates_on_the_warm_model_within_its_deadline(
    worker: SurgeryWorker, store: CheckpointStore, version: str
) -> None:
    options = {"max_new_tokens": 4}
    with pytest.raises(GenerationStopped):
        worker.generate(version, ["the city of"], options, 0.0)
    text = worker.generate(version, ["the city of"], options, 60.0)
    assert text == [greedy_text(tiny_model("llama"), build_tiny_tokenizer(), "the city of", 4)]
    base = load_base(version, worker.store, worker.cache, worker.settings)
    assert base.lock.acquire(timeout=1)  # the stopped and the finished generation let it go
    base.lock.release()
    assert worker.cache.total_bytes() == base.nbytes  # no copy of the model was made


def test_server_refuses_a_prompt_over_the_character_bound(
    store: CheckpointStore, version: str, tmp_path: Path
) -> None:
    """Refused on the event loop, before any worker (the engine here has none)."""

    async def scenario() -> tuple[grpc.StatusCode, str]:
        table = jt.JobTable(tmp_path / "jobs.sqlite3")
        metrics = ServerMetrics(table)
        settings = WorkerSettings(store_root=store.root, cache_dir=tmp_path / "cache")
        engine = JobEngine(table, EngineSettings(worker=settings), metrics)
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
                prompts = ["x" * (limits.MAX_PROMPT_CHARS + 1)]
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Generate(
                        checkpoints_pb2.GenerateRequest(ref=version, prompts=prompts)
                    )
        finally:
            await server.stop(None)
            metrics.close()
            table.close()
        status = rpc_status.from_call(caught.value)
        assert status is not None
        detail = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(detail)
        return caught.value.code(), detail.field_violations[0].field

    assert asyncio.run(scenario()) == (grpc.StatusCode.INVALID_ARGUMENT, "prompts[0]")


@pytest.mark.e2e
def test_a_cancelled_generate_stops_on_the_ray_worker(
    store: CheckpointStore, version: str, tmp_path: Path
) -> None:
    """What the server does when a Generate's caller goes away (``ray.cancel`` of the task):
    the threaded actor's generation stops at its next token (the task ends cancelled instead
    of running its 512 tokens to the end), and the worker serves the next Generate."""
    settings = WorkerSettings(store_root=store.root, cache_dir=tmp_path / "cache")
    ray.init(address="local", num_cpus=1, include_dashboard=False, configure_logging=False)
    try:
        actor = ray.remote(SurgeryWorker).options(max_concurrency=4).remote(settings, 1)
        ray.get(actor.generate.remote(version, ["paris"], {"max_new_tokens": 1}, 60.0))
        long = actor.generate.remote(
            version, ["the city of"] * limits.MAX_PROMPTS, {"max_new_tokens": 512}, 600.0
        )
        time.sleep(1.0)
        ray.cancel(long)
        ray.get(actor.generate.remote(version, ["paris"], {"max_new_tokens": 1}, 60.0))
        with pytest.raises((TaskCancelledError, GenerationStopped)):
            ray.get(long, timeout=30)
    finally:
        ray.shutdown()
