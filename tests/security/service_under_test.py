"""The real JobService and CheckpointService on a loopback port, assembled as server/app.py
does (token interceptor, alias policy, model roots), with an engine that is never started: the
checks under test all happen before a job reaches a worker."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.client import Client
from modelsurgery.server.auth import BearerTokenInterceptor, Caller
from modelsurgery.server.checkpoint_service import CheckpointService
from modelsurgery.server.engine import EngineSettings, JobEngine
from modelsurgery.server.executor import WorkerSettings
from modelsurgery.server.exports import ExportCache
from modelsurgery.server.job_service import JobService
from modelsurgery.server.job_table import JobTable
from modelsurgery.server.metrics import ServerMetrics
from modelsurgery.server.permissions import AliasPolicy
from modelsurgery.v1 import checkpoints_pb2_grpc, jobs_pb2_grpc


@dataclass
class Running:
    address: str
    store: CheckpointStore
    version: str
    model: Path

    def client(self, token: str | None = None) -> Client:
        return Client(self.address, token=token, timeout=30)


class Loop:
    """An event loop on its own thread, for the aio server under test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


@contextmanager
def running_service(
    home: Path,
    model: Any,
    tokenizer: Any,
    tokens: dict[str, Caller] | None = None,
    shared_aliases: tuple[str, ...] = (),
) -> Iterator[Running]:
    """A store holding ``model`` as a version, the same model saved under ``home/models``
    (the default model root), and both services behind the token interceptor (none without
    ``tokens``: every caller is the anonymous admin)."""
    store = CheckpointStore(home / "store")
    version = store.import_model(model, tokenizer, reference="tiny").id
    folder = home / "models" / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    table = JobTable(home / "jobs.sqlite3")
    worker = WorkerSettings(
        store_root=home / "store", cache_dir=home / "cache", data_roots=(home / "data",)
    )
    engine = JobEngine(table, EngineSettings(worker=worker), ServerMetrics(table))
    policy = AliasPolicy(shared=shared_aliases)
    roots = (home / "models",)
    jobs = JobService(
        table, engine, store, model_roots=roots, max_queued_per_caller=10, alias_policy=policy
    )
    exports = ExportCache(home / "exports", store)
    checkpoints = CheckpointService(store, engine, exports, model_roots=roots, alias_policy=policy)
    loop = Loop()

    async def start() -> tuple[grpc.aio.Server, int]:
        interceptors = [BearerTokenInterceptor(tokens)] if tokens else []
        server = grpc.aio.server(interceptors=interceptors)
        jobs_pb2_grpc.add_JobServiceServicer_to_server(jobs, server)
        checkpoints_pb2_grpc.add_CheckpointServiceServicer_to_server(checkpoints, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = loop.run(start())
    try:
        yield Running(f"127.0.0.1:{port}", store, version, folder)
    finally:
        loop.run(server.stop(None))
        loop.close()
        table.close()
