"""Proof the service holds under load, hostile input and an external Ray cluster.

- 200 jobs submitted concurrently by several clients (with deliberate duplicate request ids) are
  each accounted for exactly once and all succeed, with contiguous event streams.
- Raw, malformed protos sent to every RPC always get a proper status (never UNKNOWN/INTERNAL);
  the server keeps serving and the store stays valid.
- The server joins a real ``ray start --head`` cluster and runs a job there.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.client import Client
from modelsurgery.editing.registry import load_builtin_methods, method_names
from modelsurgery.server.process import ServerProcess, start_server
from modelsurgery.v1 import checkpoints_pb2, checkpoints_pb2_grpc, jobs_pb2, jobs_pb2_grpc

pytestmark = pytest.mark.e2e

PROPER_CODES = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
LOAD_JOBS = 200
LOAD_CLIENTS = 8
LOAD_DUPLICATES = 12
HEAD_CHOICES = [f"{layer}.{head}" for layer in range(2) for head in range(4)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(
        tmp_path_factory.mktemp("faults-home"),
        "--max-queued",
        "1000",
        "--workers",
        "1",
        model_roots=(tmp_path_factory.getbasetemp(),),
    )
    yield process
    process.stop()


def mask_spec(base: Path | str, heads: list[str], **extra: object) -> dict[str, Any]:
    return {"base": str(base), "operations": [{"method": "mask_heads", "heads": heads}], **extra}


def assert_serving_and_store_valid(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    assert server.process.poll() is None
    report = CheckpointStore(server.home / "store").verify()
    assert report.ok, report.problems


# --- many clients at once --------------------------------------------------------------------
def _load_heads(index: int) -> list[str]:
    """Two distinct heads; 56 different pairs over the jobs, so versions repeat too."""
    first = index % 8
    return [HEAD_CHOICES[first], HEAD_CHOICES[(first + 1 + (index // 8) % 7) % 8]]


def _load_plan() -> list[list[tuple[str, list[str]]]]:
    """Per client: (request_id, heads) to submit. Every job once, plus duplicates of some
    request ids sent (same spec) by a different client than the original."""
    plan: list[list[tuple[str, list[str]]]] = [[] for _ in range(LOAD_CLIENTS)]
    for index in range(LOAD_JOBS):
        heads = _load_heads(index)
        plan[index % LOAD_CLIENTS].append((f"load-{index:04d}", heads))
    for n in range(LOAD_DUPLICATES):
        index = n * (LOAD_JOBS // LOAD_DUPLICATES)
        heads = _load_heads(index)
        plan[(index + 1 + n % 3) % LOAD_CLIENTS].insert(n % 5, (f"load-{index:04d}", heads))
    return plan


def test_200_concurrent_jobs_all_accounted_for(server: ServerProcess, tiny_model_dir: Path) -> None:
    plan = _load_plan()
    submitted: dict[str, set[str]] = defaultdict(set)
    events: dict[str, list[jobs_pb2.JobEvent]] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(LOAD_CLIENTS)

    def client_thread(work: list[tuple[str, list[str]]]) -> None:
        try:
            with Client(server.address, timeout=120) as client:
                start.wait()
                mine = []
                for request_id, heads in work:
                    job = client.submit(mask_spec(tiny_model_dir, heads), request_id=request_id)
                    assert job.request_id == request_id
                    mine.append(job.id)
                    with lock:
                        submitted[request_id].add(job.id)
                for job_id in mine:
                    stream = list(client.watch(job_id))
                    with lock:
                        events[job_id] = stream
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=client_thread, args=(work,)) for work in plan]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors

    assert len(submitted) == LOAD_JOBS
    assert all(len(ids) == 1 for ids in submitted.values()), "a request id made two jobs"
    job_ids = {next(iter(ids)) for ids in submitted.values()}
    assert len(job_ids) == LOAD_JOBS

    with Client(server.address, timeout=120) as client:
        listed = list(client.list_jobs(page_size=37))
        assert len({j.id for j in listed}) == len(listed), "ListJobs repeated a job"
        ours = {j.id: j for j in listed if j.request_id.startswith("load-")}
        assert set(ours) == job_ids
        assert {j.request_id for j in ours.values()} == set(submitted)
        for job in ours.values():
            assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, (job.id, job.error)
            assert job.version_id
            assert job.attempts == 1
        for job_id, stream in events.items():
            seqs = [e.seq for e in stream]
            assert seqs == list(range(1, len(seqs) + 1)), (job_id, seqs)
            assert stream[0].state == jobs_pb2.JOB_STATE_QUEUED
            assert stream[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED
            again = list(client.watch(job_id))
            assert [e.seq for e in again] == seqs
    assert set(events) == job_ids
    assert_serving_and_store_valid(server)


# --- fuzzing the raw API ---------------------------------------------------------------------
NASTY_STRINGS = [
    "",
    " ",
    ".",
    "..",
    "/",
    "~",
    "~root/.ssh/id_rsa",
    "../../etc/passwd",
    "/etc/passwd",
    "/etc",
    "/proc/self/environ",
    "/dev/zero",
    "a\x00b",
    "\x00",
    "/" + "a" * 300,
    "x" * 5000,
    "file:///etc/passwd",
    "C:\\Windows\\System32",
    "%s%n%x",
    "${HOME}",
    "' OR 1=1 --",
    "v" + "0" * 20,
    "v" + "f" * 19,
    "vvvvvv",
    "9" * 40,
    "9" * 19,
    "²",
    "١٢٣",
    "-1",
    "1e309",
    "NaN",
    "💥🔥",
    "job-",
    "job-0000000000000000",
]
nasty = st.sampled_from(NASTY_STRINGS)
text = st.one_of(nasty, st.text(max_size=30))
int32 = st.one_of(
    st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31), 500, 501, 3 << 20, (3 << 20) + 1]),
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
)
int64 = st.one_of(
    st.sampled_from([0, 1, -1, 2**63 - 1, -(2**63), 10**12]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
floats = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, -1e308, 2.0**53 + 1]),
    st.floats(),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), floats, text),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(text, children, max_size=4)
    ),
    max_leaves=12,
)
head_strings = st.one_of(
    st.sampled_from(
        [*HEAD_CHOICES, "0.4", "2.0", "-1.0", "0.-1", " 1 . 2 ", "1.2.3", "99999999999.0"]
    ),
    text,
)


def _struct(fields: dict[str, Any]) -> struct_pb2.Struct:
    params = struct_pb2.Struct()
    params.update(fields)
    return params


@st.composite
def operations(draw: st.DrawFn) -> jobs_pb2.Operation:
    load_builtin_methods()
    method = draw(st.one_of(st.sampled_from(method_names()), text))
    if method == "mask_heads":
        fields: dict[str, Any] = {}
        if draw(st.booleans()):
            fields["heads"] = draw(
                st.one_of(st.lists(head_strings, max_size=5), json_values, head_strings)
            )
        if draw(st.booleans()):
            # Never a true value: perplexity on WikiText would make each accepted job slow.
            fields["evaluate_perplexity"] = draw(
                st.one_of(st.just(False), st.just(None), st.dictionaries(text, json_values))
            )
        fields.update(draw(st.dictionaries(text, json_values, max_size=2)))
    else:
        # Other methods get an unknown key too, so that nothing heavy is ever queued, while
        # their validators still see every random value.
        fields = draw(st.dictionaries(text, json_values, max_size=5))
        fields["fuzz-unknown-key"] = True
    return jobs_pb2.Operation(method=method, params=_struct(fields))


@st.composite
def job_specs(draw: st.DrawFn, bases: list[str]) -> jobs_pb2.JobSpec:
    return jobs_pb2.JobSpec(
        api_version=draw(st.one_of(st.sampled_from(["", "v1", "v2"]), text)),
        base=draw(st.one_of(st.sampled_from(bases), text)),
        operations=draw(st.lists(operations(), max_size=3)),
        gates=draw(
            st.dictionaries(
                text,
                st.one_of(
                    st.sampled_from(
                        [">= 1", "<= 1e999", "== nan", "> -0", "!= .5", "about 1", "<", ""]
                    ),
                    text,
                ),
                max_size=3,
            )
        ),
        alias=draw(st.one_of(st.sampled_from(["", "fuzz-alias", "bad alias!", "a" * 65]), text)),
    )


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def seeded(server: ServerProcess, tiny_model_dir: Path) -> dict[str, str]:
    """A finished job with a version (child of an imported base) and an alias, so that fuzzed
    references sometimes hit real objects."""
    with Client(server.address, timeout=120) as client:
        job = client.wait(
            client.submit(mask_spec(tiny_model_dir, ["1.1"], alias="fuzz-seed")).id, timeout=300
        )
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
        info = client.get_version(job.version_id)
    return {
        "job": job.id,
        "version": job.version_id,
        "parent": info.lineage[1],
        "alias": "fuzz-seed",
        "prefix": job.version_id[:6],
        "short": job.version_id[:3],
        "base": str(tiny_model_dir),
        "config": str(tiny_model_dir / "config.json"),
    }


def status_of(call: Callable[[], Any]) -> grpc.StatusCode:
    """The call's status; a server-streaming call is read to its end."""
    try:
        result = call()
        if isinstance(result, Iterator):
            for _ in result:
                pass
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def assert_proper_statuses(stub: Any, calls: list[tuple[str, Any]]) -> None:
    for name, request in calls:
        code = status_of(partial(getattr(stub, name), request, timeout=120))
        assert code in PROPER_CODES, f"{code} for {name}({request!r})"


def raw_spec(base: str, params: dict[str, Any]) -> jobs_pb2.SubmitJobRequest:
    operation = jobs_pb2.Operation(method="mask_heads", params=_struct(params))
    return jobs_pb2.SubmitJobRequest(spec=jobs_pb2.JobSpec(base=base, operations=[operation]))


def test_fuzz_submit_job(
    server: ServerProcess, channel: grpc.Channel, seeded: dict[str, str]
) -> None:
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    bases = [seeded["base"], seeded["version"], seeded["alias"], seeded["prefix"], seeded["config"]]
    requests = st.builds(
        lambda spec, request_id: (
            "SubmitJob",
            jobs_pb2.SubmitJobRequest(spec=spec, request_id=request_id),
        ),
        job_specs(bases),
        st.one_of(st.just(""), text, st.just("r" * 129)),
    )
    # Regressions: each of these once answered UNKNOWN.
    regressions = [
        ("SubmitJob", raw_spec(seeded["base"], {"heads": ["0.1"], "x": math.nan})),
        ("SubmitJob", raw_spec(seeded["base"], {"heads": [math.inf]})),
        ("SubmitJob", raw_spec("./a\x00b", {"heads": ["0.1"]})),
        ("SubmitJob", raw_spec("/" + "a" * 300, {"heads": ["0.1"]})),
    ]

    @FUZZ
    @example(calls=regressions)
    @given(calls=st.lists(requests, min_size=1, max_size=3))
    def submit(calls: list[tuple[str, Any]]) -> None:
        assert_proper_statuses(stub, calls)

    submit()
    assert_serving_and_store_valid(server)


def test_fuzz_job_queries(
    server: ServerProcess, channel: grpc.Channel, seeded: dict[str, str]
) -> None:
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    job_ids = st.one_of(st.just(seeded["job"]), text)
    page_tokens = st.one_of(st.sampled_from(["0", "50", "9" * 18, "9" * 25, "+1", " 1"]), text)
    calls = st.one_of(
        st.builds(lambda j: ("GetJob", jobs_pb2.GetJobRequest(job_id=j)), job_ids),
        st.builds(lambda j: ("CancelJob", jobs_pb2.CancelJobRequest(job_id=j)), job_ids),
        st.builds(
            lambda j, s: ("WatchJob", jobs_pb2.WatchJobRequest(job_id=j, after_seq=s)),
            job_ids,
            int64,
        ),
        st.builds(
            lambda states, size, token: (
                "ListJobs",
                jobs_pb2.ListJobsRequest(states=states, page_size=size, page_token=token),
            ),
            st.lists(st.integers(min_value=-(2**31), max_value=2**31 - 1), max_size=4),
            int32,
            page_tokens,
        ),
    )
    regressions = [
        ("ListJobs", jobs_pb2.ListJobsRequest(page_token="²")),
        ("ListJobs", jobs_pb2.ListJobsRequest(page_token="9" * 25)),
    ]

    @FUZZ
    @example(calls=regressions)
    @given(calls=st.lists(calls, min_size=1, max_size=4))
    def query(calls: list[tuple[str, Any]]) -> None:
        assert_proper_statuses(stub, calls)

    query()
    assert_serving_and_store_valid(server)


def test_fuzz_checkpoint_service(
    server: ServerProcess, channel: grpc.Channel, seeded: dict[str, str]
) -> None:
    stub = checkpoints_pb2_grpc.CheckpointServiceStub(channel)
    refs = st.one_of(
        st.sampled_from(
            [seeded[k] for k in ("version", "parent", "alias", "prefix", "short", "job")]
        ),
        text,
    )
    pb = checkpoints_pb2
    calls = st.one_of(
        st.builds(
            lambda size, token: (
                "ListVersions",
                pb.ListVersionsRequest(page_size=size, page_token=token),
            ),
            int32,
            st.one_of(st.sampled_from(["0", "1", "9" * 25]), text),
        ),
        st.builds(lambda r: ("GetVersion", pb.GetVersionRequest(ref=r)), refs),
        st.builds(lambda a, b: ("Diff", pb.DiffRequest(a=a, b=b)), refs, refs),
        st.builds(lambda n: ("GetAlias", pb.GetAliasRequest(name=n)), refs),
        st.builds(
            lambda n, v, check, expected: (
                "SetAlias",
                pb.SetAliasRequest(
                    name=n, version_id=v, check_expected=check, expected_version_id=expected
                ),
            ),
            st.one_of(st.just("fuzz-moved"), text),
            refs,
            st.booleans(),
            refs,
        ),
        st.builds(lambda r: ("Revert", pb.RevertRequest(ref=r)), refs),
        st.builds(
            lambda r, name: ("GetArtifact", pb.GetArtifactRequest(ref=r, name=name)),
            refs,
            st.one_of(st.sampled_from(["config.json", "../aliases.json", "heads.json"]), text),
        ),
        st.builds(
            lambda r, path, offset, chunk: (
                "DownloadVersion",
                pb.DownloadVersionRequest(ref=r, start_path=path, offset=offset, chunk_size=chunk),
            ),
            refs,
            st.one_of(
                st.sampled_from(["", "config.json", "model.safetensors", "../config.json"]), text
            ),
            int64,
            int32,
        ),
        st.builds(
            lambda r, alias: ("ImportModel", pb.ImportModelRequest(reference=r, alias=alias)),
            st.one_of(st.sampled_from([seeded["base"], seeded["config"]]), text),
            st.one_of(st.sampled_from(["", "fuzz-import"]), text),
        ),
        st.builds(
            lambda r, prompts, new, sample, temperature, top_p, seed, chat: (
                "Generate",
                pb.GenerateRequest(
                    ref=r,
                    prompts=prompts,
                    max_new_tokens=new,
                    do_sample=sample,
                    temperature=temperature,
                    top_p=top_p,
                    seed=seed,
                    chat=chat,
                ),
            ),
            refs,
            st.lists(st.one_of(st.sampled_from(["", "the city of", "paris is"]), text), max_size=3),
            st.one_of(st.integers(min_value=0, max_value=8), int32),
            st.booleans(),
            floats,
            floats,
            int64,
            st.booleans(),
        ),
    )
    regressions = [
        ("ListVersions", pb.ListVersionsRequest(page_token="²")),
        ("Generate", pb.GenerateRequest(ref=seeded["version"], prompts=["paris is", ""])),
        ("ImportModel", pb.ImportModelRequest(reference="./\x00")),
        ("ImportModel", pb.ImportModelRequest(reference="/" + "a" * 300)),
    ]

    @FUZZ
    @example(calls=regressions)
    @given(calls=st.lists(calls, min_size=1, max_size=4))
    def query(calls: list[tuple[str, Any]]) -> None:
        assert_proper_statuses(stub, calls)

    query()
    assert_serving_and_store_valid(server)


# --- an external Ray cluster ----------------------------------------------------------------
@dataclass(frozen=True)
class RayCluster:
    address: str
    temp_dir: Path
    env: dict[str, str]
    session: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pids_mentioning(marker: str) -> list[int]:
    """Processes whose command line contains ``marker`` (our cluster's unique temp dir)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if marker.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
    return pids


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    """``ray start --head`` in its own session (so its own process group), with its own temp
    dir, ports and auth token. Teardown kills that process group and any straggler naming our
    temp dir: ``ray stop`` would stop every Ray on the machine, other servers' included."""
    ray = Path(sys.executable).with_name("ray")
    # <tmp>/ray, so that a process with RAY_TMPDIR=<tmp> sees this cluster as the one
    # `ray start` last recorded on the machine (<tmp>/ray/ray_current_cluster).
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-e2e-", dir="/tmp")) / "ray"
    temp_dir.mkdir()
    port = free_port()
    # Ray >= 2.5x turns token auth on for `ray start`; give this cluster its own token rather
    # than whatever ~/.ray/auth_token holds.
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    command = [
        str(ray),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--num-cpus=2",
        "--num-gpus=0",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]
    full_env = {**os.environ, **env, "RAY_USAGE_STATS_ENABLED": "0"}
    log_path = temp_dir / "ray-start.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=full_env
        )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        status = [str(ray), "status", f"--address={address}"]
        recorded = temp_dir / "ray_current_cluster"  # written once the head is fully up
        while (
            subprocess.run(status, capture_output=True, env=full_env, check=False).returncode
            or not recorded.is_file()
        ):
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(1)
        yield RayCluster(address, temp_dir, env, (temp_dir / "session_latest").resolve())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        for pid in pids_mentioning(str(temp_dir)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir.parent, ignore_errors=True)


def test_job_on_external_ray_cluster(
    ray_cluster: RayCluster, tiny_model_dir: Path, tmp_path: Path
) -> None:
    server = start_server(
        tmp_path / "home",
        "--ray-address",
        ray_cluster.address,
        env=ray_cluster.env,
        model_roots=(tiny_model_dir,),
    )
    try:
        with Client(server.address, timeout=120) as client:
            job = client.wait(
                client.submit(mask_spec(tiny_model_dir, ["0.2", "1.0"])).id, timeout=300
            )
            assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
            assert job.metrics["op0.heads_masked"] == 2
        # The server is a driver of this cluster: its core-worker log is in the cluster's
        # session folder (an embedded Ray would have its own session under /tmp/ray).
        pattern = f"session_*/logs/python-core-driver-*_{server.process.pid}.log"
        assert list(ray_cluster.temp_dir.glob(pattern))
    finally:
        server.stop()
    report = CheckpointStore(server.home / "store").verify()
    assert report.ok, report.problems


def driver_logs(cluster: RayCluster, pid: int) -> list[Path]:
    """Core-driver logs of process ``pid`` in the cluster's session: present iff it joined."""
    return list(cluster.session.glob(f"logs/python-core-driver-*_{pid}.log"))


def test_serve_and_apply_local_embed_their_own_ray_beside_a_cluster(
    ray_cluster: RayCluster, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """With a token-auth ``ray start`` cluster recorded as the machine's current one (which a
    bare ``ray.init()`` joins, and fails to without its token), ``serve --num-cpus 2`` and
    ``apply --local`` still start their own Ray: the job runs, and neither process is a
    driver of that cluster."""
    assert (ray_cluster.temp_dir / "ray_current_cluster").read_text().strip()
    env = {"RAY_TMPDIR": str(ray_cluster.temp_dir.parent)}
    server = start_server(tmp_path / "home", env=env, model_roots=(tiny_model_dir,))
    try:
        with Client(server.address, timeout=120) as client:
            job = client.wait(client.submit(mask_spec(tiny_model_dir, ["0.1"])).id, timeout=300)
            assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
    finally:
        server.stop()
    assert not driver_logs(ray_cluster, server.process.pid)

    spec = tmp_path / "patch.yaml"
    spec.write_text(json.dumps(mask_spec(tiny_model_dir, ["1.2"])))
    apply = subprocess.Popen(
        [sys.executable, "-m", "modelsurgery.client.cli", "apply", str(spec), "--local", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **env, "MODELSURGERY_HOME": str(tmp_path / "local-home")},
    )
    stdout, stderr = apply.communicate(timeout=300)
    assert apply.returncode == 0, stderr.decode()[-2000:]
    assert json.loads(stdout)["state"] == "SUCCEEDED"
    assert not driver_logs(ray_cluster, apply.pid)
