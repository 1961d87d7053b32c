"""The server as a driver of a two-node Ray cluster on this machine (Ray's cluster_utils: a head
and one more node, one CPU each): workers ask for CPUs a node has (asking for the cluster's two
left a single worker pending for ever), spread over the nodes, and print into the server log."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray.cluster_utils import Cluster

from modelsurgery.client import Client
from modelsurgery.server.process import start_server
from modelsurgery.server.ray_pool import worker_cpus
from modelsurgery.v1 import jobs_pb2

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    nodes = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False},
    )
    try:
        nodes.add_node(num_cpus=1, num_gpus=0)
        nodes.wait_for_nodes()
        yield nodes
    finally:
        nodes.shutdown()


def mask_spec(base: Path, head: str) -> dict:
    return {"base": str(base), "operations": [{"method": "mask_heads", "heads": [head]}]}


def engine_started(log: str) -> dict:
    for line in log.splitlines():
        if line.startswith("{") and json.loads(line).get("message") == "job engine started":
            return json.loads(line)
    raise AssertionError(f"no engine start in the log:\n{log[-3000:]}")


def test_worker_cpus_fit_the_smallest_node() -> None:
    assert worker_cpus([1, 1], workers=1) == 1
    assert worker_cpus([8, 8], workers=2) == 8
    assert worker_cpus([8, 8], workers=4) == 4
    assert worker_cpus([16, 4], workers=1) == 4
    assert worker_cpus([], workers=3) == 1


def run_jobs(cluster: Cluster, home: Path, model: Path, heads: list[str], *flags: str) -> str:
    server = start_server(home, "--ray-address", cluster.address, *flags, model_roots=(model,))
    try:
        with Client(server.address, timeout=120) as client:
            jobs = [client.submit(mask_spec(model, head)) for head in heads]
            for job in jobs:
                done = client.wait(job.id, timeout=240)
                assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error
    finally:
        server.stop()
    return server.log.read_text()


def test_one_worker_starts_on_a_two_node_cluster(
    cluster: Cluster, tiny_model_dir: Path, tmp_path: Path
) -> None:
    log = run_jobs(cluster, tmp_path / "home", tiny_model_dir, ["0.1"])
    started = engine_started(log)
    assert (started["workers"], started["cpus_per_worker"], started["nodes"]) == (1, 1, 2)


def test_workers_spread_over_the_nodes_and_log_to_the_server(
    cluster: Cluster, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Two one-CPU workers on two one-CPU nodes: both jobs finish only if each node runs one."""
    log = run_jobs(
        cluster,
        tmp_path / "home",
        tiny_model_dir,
        ["0.2", "1.3"],
        "--workers",
        "2",
        "--worker-cpus",
        "1",
    )
    started = engine_started(log)
    assert (started["workers"], started["cpus_per_worker"]) == (2, 1)
    # Each worker loaded the model, and what it printed reached the server's log.
    assert len(set(re.findall(r"SurgeryWorker pid=(\d+)", log))) == 2, log[-3000:]
