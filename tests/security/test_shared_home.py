"""Many servers, one home (issue 17): two servers sharing a store and job table run every job
exactly once, a cancel sent through one server stops the job the other runs, parallel
``apply --local`` runs on one home all succeed, and a server that died right after publishing
a version has its job recorded SUCCEEDED with that version on the next start."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.client import Client
from modelsurgery.server.process import start_server
from modelsurgery.v1 import jobs_pb2

pytestmark = pytest.mark.e2e
SUCCEEDED = jobs_pb2.JOB_STATE_SUCCEEDED


def mask_spec(model: Path, head: str, **extra: object) -> dict:
    return {"base": str(model), "operations": [{"method": "mask_heads", "heads": [head]}], **extra}


def slow_spec(model: Path) -> dict:
    """A job that runs long enough to be cancelled mid-way (ReFT with many epochs)."""
    examples = [{"prompt": "the capital of france is", "completion": " paris"}] * 256
    return {
        "base": str(model),
        "operations": [{"method": "reft", "layers": [0], "examples": examples, "epochs": 1000}],
    }


def attempt_events(client: Client, job_id: str) -> list[str]:
    return [e.message for e in client.watch(job_id) if e.message.startswith("attempt")]


def lease_owner_pid(home: Path, job_id: str) -> int:
    with sqlite3.connect(home / "jobs.sqlite3") as db:
        (owner,) = db.execute("SELECT lease_owner FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return int(owner.split(":")[1])


def test_two_servers_share_a_home_each_job_runs_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    roots = (tiny_model_dir,)
    first = start_server(home, model_roots=roots)
    second = start_server(tmp_path / "second", "--store", str(home / "store"), model_roots=roots)
    try:
        with Client(first.address, timeout=60) as a, Client(second.address, timeout=60) as b:
            jobs = [
                (a if i % 2 else b).submit(mask_spec(tiny_model_dir, f"{i % 2}.{i % 4}"))
                for i in range(6)
            ]
            for job in jobs:
                done = a.wait(job.id, timeout=300)
                assert done.state == SUCCEEDED, done.error
                assert done.attempts == 1
                assert attempt_events(b, job.id) == ["attempt 1"]

            slow = a.submit(slow_spec(tiny_model_dir))
            deadline = time.monotonic() + 120
            while a.get_job(slow.id).state != jobs_pb2.JOB_STATE_RUNNING:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            runner = lease_owner_pid(home, slow.id)
            other = b if runner == first.process.pid else a
            other.cancel(slow.id)
            ended = other.wait(slow.id, timeout=120)
            assert ended.state == jobs_pb2.JOB_STATE_CANCELLED
            seen = len(list(a.watch(slow.id)))
            time.sleep(3)
            assert len(list(a.watch(slow.id))) == seen, "the worker kept writing events"
    finally:
        first.stop()
        second.stop()
    assert CheckpointStore(home / "store").verify().ok


def test_parallel_apply_local_runs_on_one_home_all_succeed(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    runs = []
    for i in range(2):
        spec = tmp_path / f"patch-{i}.yaml"
        spec.write_text(yaml.safe_dump(mask_spec(tiny_model_dir, f"{i}.1")))
        command = [sys.executable, "-m", "modelsurgery.client.cli", "apply", str(spec)]
        runs.append(
            subprocess.Popen(
                [*command, "--local", "--wait", "--json"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**os.environ, "MODELSURGERY_HOME": str(home)},
            )
        )
    outputs = [run.communicate(timeout=400) for run in runs]
    for run, (stdout, stderr) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, stderr.decode()[-3000:]
        assert json.loads(stdout)["state"] == "SUCCEEDED"
    with sqlite3.connect(home / "jobs.sqlite3") as db:
        rows = db.execute("SELECT state, attempts FROM jobs").fetchall()
    assert sorted(rows) == [("SUCCEEDED", 1), ("SUCCEEDED", 1)]


def test_a_version_published_before_a_crash_makes_its_job_succeed(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The state a kill right after the publish and alias move leaves: the job row RUNNING
    under a server that is gone, the version (naming the job) and the alias written."""
    home = tmp_path / "home"
    server = start_server(home, model_roots=(tiny_model_dir,))
    try:
        with Client(server.address, timeout=60) as client:
            done = client.wait(client.submit(mask_spec(tiny_model_dir, "0.2")).id, timeout=300)
            root = client.get_version(done.version_id).version.parent_id
    finally:
        server.stop()
    store = CheckpointStore(home / "store")
    name = "model.layers.1.self_attn.o_proj.weight"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = f"{socket.gethostname()}:{dead.pid}:gone"  # a server process that no longer exists
    with sqlite3.connect(home / "jobs.sqlite3") as db:
        (spec_json,) = db.execute("SELECT spec_json FROM jobs").fetchone()
        spec = {**json.loads(spec_json), "alias": "crashed"}
        db.execute(
            "INSERT INTO jobs (id, request_id, caller, spec_json, spec_fingerprint, state, created,"
            " started, attempts, lease_owner, lease_expires) VALUES"
            " ('job-crashed', 'job-crashed', 'anonymous', ?, 'f', 'RUNNING', 1, 1, 1, ?, ?)",
            (json.dumps(spec), owner, time.time() + 3600),
        )
        db.execute(
            "INSERT INTO events VALUES ('job-crashed', 1, 1, 'state', 'RUNNING', 'attempt 1', '{}')"
        )
    published = store.commit(
        root,
        {name: torch.zeros_like(store.tensor(root, name))},
        operations=spec["operations"],
        metrics={"parameter_ratio": 1.0},
        job_id="job-crashed",
    )
    store.set_alias("crashed", published.id)
    server = start_server(home, model_roots=(tiny_model_dir,))
    try:
        with Client(server.address, timeout=60) as client:
            job = client.wait("job-crashed", timeout=120)
            assert (job.state, job.version_id) == (SUCCEEDED, published.id)
            assert client.get_alias("crashed") == published.id
    finally:
        server.stop()
