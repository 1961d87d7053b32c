"""Writer processes for the store's crash and concurrency tests.

Writers are forked from the test process (torch is already imported there, so a writer starts
in milliseconds) and use one torch thread, which keeps OpenMP safe after fork. Each writer
opens its own ``CheckpointStore`` on the shared root, as a separate server process would.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch

from modelsurgery.checkpoints import AliasConflictError, CheckpointStore
from modelsurgery.checkpoints import store as store_module

BIG_TENSOR = "model.layers.0.mlp.down_proj.weight"
SMALL_TENSOR = "model.norm.weight"
FORK = multiprocessing.get_context("fork")


def start(target: Callable[..., None], *args: Any) -> BaseProcess:
    def run() -> None:
        torch.set_num_threads(1)
        target(*args)

    process = FORK.Process(target=run, daemon=True)
    process.start()
    return process


def big_commit(store: CheckpointStore, parent: str, seed: int) -> str:
    """A version changing a 16 MiB tensor, so a kill often lands inside its write."""
    generator = torch.Generator().manual_seed(seed)
    changed = {
        BIG_TENSOR: torch.randn(2048, 2048, generator=generator),
        SMALL_TENSOR: torch.randn(64, generator=generator),
    }
    return store.commit(parent, changed, operations=[{"method": "test", "seed": seed}]).id


def commit_forever(root: Path, seed: int, first_done: Any) -> None:
    """Commit a chain of versions until killed, continuing from the newest version."""
    store = CheckpointStore(root)
    parent = store.list_versions()[0].id
    while True:
        parent = big_commit(store, parent, seed)
        seed += 1000
        first_done.set()


def chain_tensor(writer: int, step: int) -> torch.Tensor:
    return torch.randn(64, generator=torch.Generator().manual_seed(writer * 1000 + step))


def commit_chain(
    root: Path, base: str, writer: int, count: int, barrier: Any, results: Any
) -> None:
    """After the barrier: ``count`` chained commits, then one commit both writers share."""
    store = CheckpointStore(root)
    barrier.wait()
    chain, parent = [], base
    for step in range(count):
        changed = {SMALL_TENSOR: chain_tensor(writer, step)}
        parent = store.commit(parent, changed, operations=[{"writer": writer, "step": step}]).id
        chain.append(parent)
    shared = {SMALL_TENSOR: torch.full((64,), 7.0)}
    chain.append(store.commit(base, shared, operations=[{"shared": True}]).id)
    results.put((writer, chain))


def race_alias(
    root: Path, name: str, version: str, expected: str | None, barrier: Any, results: Any
) -> None:
    """After the barrier: CAS ``name`` from ``expected`` to ``version``; report who won."""
    store = CheckpointStore(root)
    barrier.wait()
    try:
        store.set_alias(name, version, expected=expected)
    except AliasConflictError:
        results.put((version, False))
    else:
        results.put((version, True))


def die_writing_manifest(root: Path, parent: str) -> None:
    """Write the blobs, then die halfway through the manifest's temp file (before rename)."""

    def half_write(path: Path, data: bytes, tmp_dir: Path) -> None:
        with open(tmp_dir / f"{os.getpid()}@{socket.gethostname()}@dead.tmp", "wb") as f:
            f.write(data[: len(data) // 2])
        os._exit(137)

    store = CheckpointStore(root)
    store_module.atomic_write = half_write
    big_commit(store, parent, seed=1)
