"""What load, hostile callers and faults cost, against the real server in one run.

Fault and load (issue 29, the default), on a tiny random Llama saved to a folder (mask_heads jobs;
``--workers`` worker actors, 1 by default):

1. GetJob p99 latency with the server idle, after a warm-up job has loaded the model.
2. ``--ids`` x ``--repeats`` (40 x 3) submits at once from ``--clients`` threads: every request id
   sent ``--repeats`` times with the same spec, so one job per request id. A WatchJob stream per
   job; a separate process calls GetJob without pause throughout (p99, so this process's
   threads do not measure their own GIL).
3. Once all submits are acknowledged, faults while the jobs run: CancelJob on every
   ``--cancel-every``-th request id's job; SIGKILL of the server's Ray worker process (found in
   the server's session by its ``ray::SurgeryWorker`` title) while a job runs; then a disk-full
   interval: the server's home is a ``--home-mb`` tmpfs, a filler file takes its free space for
   ``--full-seconds`` while jobs run and more are submitted, then is deleted. Without root or
   where ``mount`` is refused the home is a plain folder and the interval is skipped, with the
   reason printed (filling a shared disk is not an option).
4. After the jobs settle, a job submitted after the faults must succeed; then the checks: every
   acknowledged job accounted for exactly once (one job row per request id, each terminal, its
   WatchJob stream contiguous and ending in that state), no job left RUNNING, no version
   without its job row SUCCEEDED (manifests' ``job_id``, ``CheckpointStore.version_of_job``),
   ``CheckpointStore.verify()`` and SQLite ``PRAGMA integrity_check`` clean, and GetJob p99 under
   load against idle as a ratio (target: within 3x). Exits 1 when a check fails.

Issue 17's measurements (``--callers``, on ``--base``, after the run above): GetJob median with
``--watchers`` open WatchJob streams on a running job against none; cancel latency of a job that
reports every step; a job after an abandoned Generate against one without.

    sudo .venv/bin/python benchmarks/hostile_load.py [--ids 40] [--repeats 3] [--callers]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import json
import multiprocessing
import os
import random
import shlex
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.client import Client
from modelsurgery.client.errors import ModelSurgeryError
from modelsurgery.models.hardware import describe
from modelsurgery.proto.job_state import JobState
from modelsurgery.server.process import ServerProcess, start_server
from modelsurgery.v1 import jobs_pb2

RUNNING = jobs_pb2.JOB_STATE_RUNNING
HEADS = [f"{layer}.{head}" for layer in range(2) for head in range(4)]
HEAD_SETS = [c for size in (1, 2, 3) for c in itertools.combinations(HEADS, size)]
SPECIAL_WORDS = ["<unk>", "<s>", "</s>", "<pad>"]
TEXT = (
    "the a of in is was and to it he she they paris london rome berlin france england italy "
    "germany capital city country river language speaks lives . ,"
)
WORDS = SPECIAL_WORDS + TEXT.split(" ")
LATENCY_TARGET = 3.0
FILL_CHUNK = 1 << 20


# --- the tiny model ------------------------------------------------------------------------
def save_tiny_llama(folder: Path) -> None:
    """A random two-layer Llama (4 heads) and a word-level tokenizer, as a Hugging Face folder."""
    import torch
    from tokenizers import Tokenizer, models
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        vocab_size=len(WORDS),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def head_spec(base: str, head: str) -> dict[str, Any]:
    return {"base": base, "operations": [{"method": "mask_heads", "heads": [head]}]}


def mask_spec(base: str, index: int) -> dict[str, Any]:
    """Masks one to three of the tiny Llama's eight heads: 92 distinct specs, so each job
    publishes a version of its own (jobs with one spec would share one, content-addressed)."""
    heads = HEAD_SETS[index % len(HEAD_SETS)]
    return {"base": base, "operations": [{"method": "mask_heads", "heads": list(heads)}]}


# --- GetJob latency, from another process ---------------------------------------------------
def sample_latency(address: str, job_ids: list[str], calls: int, stop: Any, out: Any) -> None:
    """GetJob round trips over ``job_ids`` until ``calls`` are made or ``stop`` is set."""
    times = []
    with Client(address, timeout=60) as client:
        index = 0
        while (calls and len(times) < calls) or (not calls and not stop.is_set()):
            start = time.perf_counter()
            client.get_job(job_ids[index % len(job_ids)])
            times.append(time.perf_counter() - start)
            index += 1
    out.put(times)


class LatencySampler:
    """``sample_latency`` in a spawned process."""

    def __init__(self, address: str, job_ids: list[str], calls: int = 0) -> None:
        context = multiprocessing.get_context("spawn")
        self.stop = context.Event()
        self.out = context.Queue()
        self.process = context.Process(
            target=sample_latency, args=(address, job_ids, calls, self.stop, self.out)
        )
        self.process.start()

    def result(self) -> list[float]:
        self.stop.set()
        times = self.out.get(timeout=120)
        self.process.join(timeout=30)
        return times


def p99(times: list[float]) -> float:
    return statistics.quantiles(times, n=100)[98]


# --- the server's home and its faults -------------------------------------------------------
@dataclass
class Home:
    path: Path
    mounted: bool
    why_not: str = ""


@contextlib.contextmanager
def server_home(parent: Path, megabytes: int) -> Iterator[Home]:
    """A size-limited tmpfs for the server's home where this process may mount one."""
    path = parent / "home"
    path.mkdir()
    if os.geteuid() != 0:
        yield Home(path, False, "not root: cannot mount a tmpfs")
        return
    mount = ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m,mode=0700", "tmpfs", str(path)]
    done = subprocess.run(mount, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        yield Home(path, False, f"mount refused: {done.stderr.strip() or done.returncode}")
        return
    try:
        yield Home(path, True)
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> tuple[Path, int]:
    """Take the file system's free space with one file: (its path, bytes written)."""
    filler = folder / "filler.bin"
    written = 0
    chunk = b"\0" * FILL_CHUNK
    with filler.open("wb", buffering=0) as handle:
        while len(chunk) >= 512:
            try:
                written += handle.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk = chunk[: len(chunk) // 2]
    return filler, written


def worker_pids(session: int) -> list[int]:
    """Ray worker processes of the server (its own session) that host a SurgeryWorker actor."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getsid(int(proc.name)) != session:
                continue
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::SurgeryWorker"):
            pids.append(int(proc.name))
    return pids


# --- the run -------------------------------------------------------------------------------
@dataclass
class Ledger:
    """What the server acknowledged and what the watchers saw, shared by the client threads."""

    acknowledged: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    refused: list[tuple[str, str]] = field(default_factory=list)
    streams: dict[str, list[jobs_pb2.JobEvent]] = field(default_factory=dict)
    watch_errors: dict[str, str] = field(default_factory=dict)
    watcher: Client | None = None
    """The channel the WatchJob streams share (open until the jobs settle)."""
    killed: list[str] = field(default_factory=list)
    """The jobs running when the worker was killed."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    watchers: list[threading.Thread] = field(default_factory=list)

    def job_ids(self) -> list[str]:
        with self.lock:
            return sorted({i for ids in self.acknowledged.values() for i in ids})


def submit(client: Client, ledger: Ledger, spec: dict, request_id: str) -> str | None:
    try:
        job = client.submit(spec, request_id=request_id)
    except ModelSurgeryError as exc:
        with ledger.lock:
            ledger.refused.append((request_id, f"{exc.code.name}: {exc.message[:160]}"))
        return None
    with ledger.lock:
        first = job.id not in {i for ids in ledger.acknowledged.values() for i in ids}
        ledger.acknowledged[request_id].add(job.id)
    if first and ledger.watcher is not None:
        watch(ledger.watcher, ledger, job.id)
    return job.id


def watch(client: Client, ledger: Ledger, job_id: str) -> None:
    def run() -> None:
        try:
            stream = list(client.watch(job_id, timeout=900))
        except ModelSurgeryError as exc:
            with ledger.lock:
                ledger.watch_errors[job_id] = f"{exc.code.name}: {exc.message[:160]}"
            return
        with ledger.lock:
            ledger.streams[job_id] = stream

    thread = threading.Thread(target=run, daemon=True)
    with ledger.lock:
        ledger.watchers.append(thread)
    thread.start()


def concurrent_submits(
    address: str, base: str, ids: int, repeats: int, clients: int, ledger: Ledger
) -> float:
    """Every request id ``repeats`` times with the same spec, shuffled over ``clients`` threads
    that start together; the wall time until all are answered."""
    sends = [(f"load-{i:03d}", i) for i in range(ids) for _ in range(repeats)]
    random.Random(29).shuffle(sends)
    barrier = threading.Barrier(clients + 1)

    def run(share: list[tuple[str, int]]) -> None:
        with Client(address, timeout=120) as client:
            barrier.wait()
            for request_id, index in share:
                submit(client, ledger, mask_spec(base, index), request_id)

    threads = [
        threading.Thread(target=run, args=(sends[n::clients],), daemon=True) for n in range(clients)
    ]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def until(condition: Callable[[], bool], timeout: float, period: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(period)
    return False


def states(client: Client, job_ids: list[str]) -> dict[str, JobState]:
    return {i: JobState.from_proto(client.get_job(i).state) for i in job_ids}


def count_in(client: Client, job_ids: list[str], wanted: set[JobState]) -> int:
    return sum(state in wanted for state in states(client, job_ids).values())


def faults(
    server: ServerProcess, home: Home, base: str, args: argparse.Namespace, ledger: Ledger
) -> None:
    """Cancels, a worker kill while a job runs, then the disk-full interval."""
    with Client(server.address, timeout=60) as client:
        cancelled = [
            next(iter(ledger.acknowledged[f"load-{i:03d}"]))
            for i in range(0, args.ids, args.cancel_every)
            if ledger.acknowledged.get(f"load-{i:03d}")
        ]
        answers = Counter()
        for job_id in cancelled:
            try:
                answers[JobState.from_proto(client.cancel(job_id).state).value] += 1
            except ModelSurgeryError as exc:
                answers[exc.code.name] += 1
        print(f"cancels: {len(cancelled)} sent; answers {dict(answers)}")

        ledger.killed = kill_worker(client, server, ledger, cancelled)
        disk_full(client, server, home, base, args, ledger)


def kill_worker(
    client: Client, server: ServerProcess, ledger: Ledger, cancelled: list[str]
) -> list[str]:
    """SIGKILL the worker as soon as a job no one cancelled runs; the jobs it ran, after the
    worker is back (a new process, and a job it started has succeeded)."""
    running: list[str] = []

    def some_running() -> bool:
        running[:] = [j.id for j in client.list_jobs(states=["running"]) if j.id not in cancelled]
        return bool(running)

    if not until(some_running, 120, 0.02):
        print("worker kill: skipped (no uncancelled job was running within 120 s)")
        return []
    pids = worker_pids(server.process.pid)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    killed_at = time.perf_counter()
    before = states(client, ledger.job_ids())
    done = {i for i, s in before.items() if s is JobState.SUCCEEDED} | set(running)
    print(
        f"worker kill: SIGKILL to ray::SurgeryWorker pid(s) {pids} while {running} RUNNING "
        f"({len(done) - len(running)} jobs had succeeded)"
    )
    settled = until(lambda: JobState.RUNNING not in states(client, running).values(), 120, 0.2)
    print(
        f"  the killed job(s) left RUNNING after {time.perf_counter() - killed_at:.1f} s: "
        f"{ {i: s.value for i, s in states(client, running).items()} }"
        + ("" if settled else " (still RUNNING after 120 s)")
    )

    def back() -> bool:
        now = states(client, ledger.job_ids())
        if all(s.is_terminal for s in now.values()):
            return True
        fresh = [p for p in worker_pids(server.process.pid) if p not in pids]
        ran = any(s is JobState.SUCCEEDED and i not in done for i, s in now.items())
        return bool(fresh) and ran

    came_back = until(back, 180, 0.5)
    print(
        f"  worker back: {'yes' if came_back else 'no'} after "
        f"{time.perf_counter() - killed_at:.1f} s (new pid(s) "
        f"{[p for p in worker_pids(server.process.pid) if p not in pids]}, a job it started "
        "succeeded)"
    )
    return running


def disk_full(
    client: Client,
    server: ServerProcess,
    home: Home,
    base: str,
    args: argparse.Namespace,
    ledger: Ledger,
) -> None:
    if not home.mounted:
        print(f"disk full: skipped ({home.why_not})")
        return
    pending = count_in(client, ledger.job_ids(), {JobState.QUEUED, JobState.RUNNING})
    filler, written = fill(home.path)
    free = os.statvfs(home.path)
    print(
        f"disk full: filler of {written / 1e6:.1f} MB leaves {free.f_bavail * free.f_frsize} "
        f"bytes free on the home; {pending} jobs queued or running"
    )
    before = dict(Counter(state.value for state in states(client, ledger.job_ids()).values()))
    start = time.monotonic()
    sent = 0
    while time.monotonic() - start < args.full_seconds:
        submit(client, ledger, mask_spec(base, args.ids + sent), f"full-{sent:02d}")
        sent += 1
        time.sleep(args.full_seconds / 4)
    during = dict(Counter(state.value for state in states(client, ledger.job_ids()).values()))
    filler.unlink()
    answered = {r: sorted(ids) for r, ids in ledger.acknowledged.items() if r.startswith("full-")}
    print(
        f"  {args.full_seconds:g} s full: {sent} submits, {len(answered)} acknowledged, "
        f"refusals {[r for r in ledger.refused if r[0].startswith('full-')]}"
    )
    print(f"  job states when filled {before}, when freed {during}")
    print(f"  server alive after the interval: {server.process.poll() is None}")


def settle(client: Client, ledger: Ledger, timeout: float) -> dict[str, JobState]:
    """Wait for every acknowledged job to end; their states then (a job still RUNNING after
    ``timeout`` has no live task)."""
    ids = ledger.job_ids()
    until(
        lambda: all(s.is_terminal for s in states(client, ids).values()),
        timeout,
        0.5,
    )
    return states(client, ids)


# --- the checks ----------------------------------------------------------------------------
class Checks:
    """Prints each check's verdict and keeps the names of those that failed."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, name: str, problems: list[str]) -> None:
        if problems:
            self.failed.append(name)
            print(f"FAILED  {name}: {len(problems)} problem(s)")
            for problem in problems[:10]:
                print(f"        {problem}")
        else:
            print(f"ok      {name}")


def job_rows(database: Path) -> list[sqlite3.Row]:
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.row_factory = sqlite3.Row
        return db.execute(
            "SELECT id, request_id, state, version_id, previous_attempt, attempts, error FROM jobs"
        ).fetchall()


def integrity(database: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(database)) as db:
        answer = [row[0] for row in db.execute("PRAGMA integrity_check")]
    return [] if answer == ["ok"] else answer


def accounting(ledger: Ledger, rows: list[sqlite3.Row], final: dict[str, JobState]) -> list[str]:
    problems = []
    by_request = defaultdict(list)
    for row in rows:
        by_request[row["request_id"]].append(row)
    for request_id, ids in sorted(ledger.acknowledged.items()):
        if len(ids) != 1:
            problems.append(f"{request_id}: acknowledged as {len(ids)} jobs {sorted(ids)}")
            continue
        (job_id,) = ids
        matching = by_request.get(request_id, [])
        if [r["id"] for r in matching] != [job_id]:
            problems.append(
                f"{request_id}: acknowledged {job_id}, rows {[r['id'] for r in matching]}"
            )
        if not final.get(job_id, JobState.QUEUED).is_terminal:
            problems.append(f"{request_id}: {job_id} ended {final.get(job_id)}")
    acknowledged = {i for ids in ledger.acknowledged.values() for i in ids}
    for row in rows:
        if row["id"] not in acknowledged and row["request_id"].startswith(("load-", "full-")):
            problems.append(f"row {row['id']} ({row['request_id']}) was never acknowledged")
    return problems


def streams(ledger: Ledger, final: dict[str, JobState]) -> list[str]:
    problems = [f"{i}: watch failed ({e})" for i, e in sorted(ledger.watch_errors.items())]
    for job_id, events in sorted(ledger.streams.items()):
        seqs = [e.seq for e in events]
        if seqs != list(range(1, len(seqs) + 1)):
            problems.append(f"{job_id}: event seqs {seqs}")
        elif JobState.from_proto(events[-1].state) is not final[job_id]:
            problems.append(f"{job_id}: stream ends {events[-1].state}, job {final[job_id]}")
    missing = set(final) - set(ledger.streams) - set(ledger.watch_errors)
    problems += [f"{i}: no watcher finished" for i in sorted(missing)]
    return problems


def versions(store: CheckpointStore, rows: list[sqlite3.Row]) -> list[str]:
    problems = []
    jobs = {row["id"]: row for row in rows}
    for manifest in store.list_versions():
        if manifest.job_id is None:
            continue
        row = jobs.get(manifest.job_id)
        if row is None or row["state"] != JobState.SUCCEEDED or row["version_id"] != manifest.id:
            seen = "no row" if row is None else f"{row['state']}, version {row['version_id']}"
            problems.append(f"version {manifest.id} of job {manifest.job_id}: {seen}")
    for row in rows:
        if row["state"] != JobState.SUCCEEDED:
            continue
        published = store.version_of_job(row["id"])
        if published is None:  # an identical version another job published first
            with contextlib.suppress(KeyError):
                published = store.get(row["version_id"])
            first = jobs.get(published.job_id) if published is not None else None
            if first is None or first["version_id"] != row["version_id"]:
                problems.append(f"job {row['id']}: version {row['version_id']} not in the store")
        elif published.id != row["version_id"]:
            problems.append(
                f"job {row['id']} SUCCEEDED with {row['version_id']}, published {published.id}"
            )
    return problems


def logged_errors(log: Path) -> Counter:
    """Error-level records of the server's JSON log, by message and the exception's last line."""
    found: Counter = Counter()
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("level") in ("error", "critical"):
                exception = str(record.get("exception", "")).strip().splitlines()
                cause = f" [{exception[-1][:160]}]" if exception else ""
                found[f"{str(record.get('message'))[:140]}{cause}"] += 1
    return found


def fault_and_load(args: argparse.Namespace, tmp: Path) -> list[str]:
    models = tmp / "models"
    save_tiny_llama(models / "tiny-llama")
    base = str(models / "tiny-llama")
    checks = Checks()
    with server_home(tmp, args.home_mb) as home:
        kind = f"tmpfs of {args.home_mb} MB" if home.mounted else f"plain folder ({home.why_not})"
        print(f"server home: {kind}")
        # The log outside the home, so what the server says while the home is full is kept.
        (home.path / "server.log").symlink_to(tmp / "server.log")
        server = start_server(
            home.path,
            "--max-queued",
            "1000",
            "--workers",
            str(args.workers),
            model_roots=(models,),
        )
        try:
            with Client(server.address, timeout=120) as client:
                start = time.perf_counter()
                warm = client.wait(client.submit(mask_spec(base, -1), request_id="warm-up").id)
                print(
                    f"warm-up job: {JobState.from_proto(warm.state).value} in "
                    f"{time.perf_counter() - start:.1f} s"
                )
                idle = LatencySampler(server.address, [warm.id], calls=args.idle_calls).result()

                ledger = Ledger(watcher=Client(server.address, timeout=120))
                loaded = LatencySampler(server.address, [warm.id])
                took = concurrent_submits(
                    server.address, base, args.ids, args.repeats, args.clients, ledger
                )
                load_started = time.perf_counter()
                print(
                    f"submits: {args.ids * args.repeats} from {args.clients} threads answered in "
                    f"{took:.2f} s: {len(ledger.job_ids())} jobs for {len(ledger.acknowledged)} "
                    f"request ids, {len(ledger.refused)} refused {ledger.refused[:3]}"
                )
                faults(server, home, base, args, ledger)
                final = settle(client, ledger, args.settle_timeout)
                under_load = loaded.result()
                for thread in ledger.watchers:
                    thread.join(timeout=60)
                ledger.watcher.close()
                drained = time.perf_counter() - load_started
                print(
                    f"jobs settled {drained:.1f} s after the submits: "
                    f"{dict(Counter(s.value for s in final.values()))}"
                )
                after = client.wait(client.submit(mask_spec(base, -2)).id, timeout=300)
                recovered = JobState.from_proto(after.state)
                print(f"a job after the faults: {recovered.value} {after.error[:200]}")
                for job_id in ledger.killed:
                    job = client.get_job(job_id)
                    print(
                        f"killed job {job_id}: {JobState.from_proto(job.state).value} after "
                        f"{job.attempts} attempt(s) {job.error[:200]}"
                    )
                for job_id in [i for i, s in final.items() if s is JobState.FAILED][:5]:
                    job = client.get_job(job_id)
                    print(
                        f"FAILED {job_id} ({job.request_id}, {job.attempts} attempts): "
                        f"{job.error[:200]}"
                    )
                stuck = [i for i, s in final.items() if s is JobState.RUNNING]
                queued = [i for i, s in final.items() if s is JobState.QUEUED]
                alive = server.process.poll() is None
        finally:
            server.stop()
        store = CheckpointStore(home.path / "store")
        rows = job_rows(home.path / "jobs.sqlite3")
        print()
        checks.check("server alive through the run", [] if alive else ["server exited"])
        checks.check("every acknowledged job accounted for once", accounting(ledger, rows, final))
        checks.check(
            "WatchJob streams contiguous, ending in the job's state", streams(ledger, final)
        )
        checks.check(
            "no job left RUNNING without a live task (or QUEUED)",
            [f"{i} RUNNING" for i in stuck] + [f"{i} QUEUED" for i in queued],
        )
        checks.check(
            "a job after the faults succeeds",
            []
            if recovered is JobState.SUCCEEDED
            else [f"{after.id} {recovered.value}: {after.error[:200]}"],
        )
        checks.check("no version without its job row SUCCEEDED", versions(store, rows))
        report = store.verify()
        checks.check(
            f"CheckpointStore.verify() ({report.versions_checked} versions, "
            f"{report.blobs_checked} blobs)",
            list(report.problems),
        )
        checks.check("SQLite PRAGMA integrity_check", integrity(home.path / "jobs.sqlite3"))
        idle_p99, load_p99 = p99(idle), p99(under_load)
        ratio = load_p99 / idle_p99
        print(
            f"GetJob p99: {idle_p99 * 1e3:.2f} ms idle ({len(idle)} calls), "
            f"{load_p99 * 1e3:.2f} ms under load ({len(under_load)} calls): ratio {ratio:.2f}x "
            f"(target within {LATENCY_TARGET:g}x)"
        )
        checks.check(
            f"GetJob p99 under load within {LATENCY_TARGET:g}x idle",
            [] if ratio <= LATENCY_TARGET else [f"ratio {ratio:.2f}x"],
        )
        errors = logged_errors(server.log)
        print(f"server log: {sum(errors.values())} error records")
        for message, count in errors.most_common(8):
            print(f"  {count} x {message}")
    return checks.failed


# --- issue 17: careless callers ------------------------------------------------------------
def slow_spec(base: str) -> dict:
    """A ReFT job reporting every step, long enough to be watched and cancelled."""
    examples = [{"prompt": "The capital of France is", "completion": " Paris"}] * 64
    return {
        "base": base,
        "operations": [{"method": "reft", "layers": [3], "examples": examples, "epochs": 1000}],
    }


def until_running(client: Client, job_id: str) -> None:
    while client.get_job(job_id).state != RUNNING:
        time.sleep(0.05)


def get_latency(client: Client, job_id: str, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        client.get_job(job_id)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def open_watchers(address: str, job_id: str, count: int) -> list[threading.Thread]:
    def run() -> None:
        with Client(address, timeout=600) as client:
            for _ in client.watch(job_id):
                pass

    threads = [threading.Thread(target=run, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def job_seconds(client: Client, spec: dict) -> tuple[float, jobs_pb2.Job]:
    start = time.perf_counter()
    job = client.wait(client.submit(spec).id, timeout=600)
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
    return time.perf_counter() - start, job


def careless_callers(args: argparse.Namespace, tmp: Path) -> None:
    server = start_server(tmp / "callers-home")
    try:
        with Client(server.address, timeout=120) as client:
            _, warm = job_seconds(client, head_spec(args.base, "0.0"))  # loads the base
            root = client.get_version(warm.version_id).version.parent_id
            slow = client.submit(slow_spec(args.base))
            until_running(client, slow.id)
            alone = get_latency(client, slow.id, args.calls)
            watchers = open_watchers(server.address, slow.id, args.watchers)
            time.sleep(5)
            crowded = get_latency(client, slow.id, args.calls)
            print(
                f"GetJob median: {alone * 1e3:.2f} ms alone, {crowded * 1e3:.2f} ms with "
                f"{args.watchers} watchers: ratio {crowded / alone:.2f}x"
            )
            start = time.perf_counter()
            client.cancel(slow.id)
            ended = client.wait(slow.id, timeout=600)
            print(
                f"cancel of a running job: {time.perf_counter() - start:.2f} s to "
                f"{jobs_pb2.JobState.Name(ended.state)}"
            )
            for thread in watchers:
                thread.join(timeout=60)
            plain, _ = job_seconds(client, head_spec(args.base, "1.1"))
            try:
                client.generate(root, ["Once upon a time"], max_new_tokens=512, timeout=0.5)
            except ModelSurgeryError as exc:
                print(f"abandoned Generate: {type(exc).__name__}")
            after, _ = job_seconds(client, head_spec(args.base, "1.2"))
            print(
                f"job after an abandoned Generate: {after:.2f} s vs {plain:.2f} s without: "
                f"ratio {after / plain:.2f}x"
            )
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=40, help="Distinct request ids.")
    parser.add_argument("--repeats", type=int, default=3, help="Submits per request id.")
    parser.add_argument("--clients", type=int, default=12, help="Submitting threads.")
    parser.add_argument("--workers", type=int, default=1, help="The server's worker actors.")
    parser.add_argument("--cancel-every", type=int, default=8)
    parser.add_argument("--full-seconds", type=float, default=4.0)
    parser.add_argument("--home-mb", type=int, default=256)
    parser.add_argument("--idle-calls", type=int, default=400)
    parser.add_argument("--settle-timeout", type=float, default=300.0)
    parser.add_argument("--callers", action="store_true", help="Also issue 17's measurements.")
    parser.add_argument("--base", default="smollm2-135m", help="The --callers base model.")
    parser.add_argument("--watchers", type=int, default=200)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"device: {describe()}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hostile-load-") as tmp:
        failed = fault_and_load(args, Path(tmp))
        if args.callers:
            careless_callers(args, Path(tmp))
    print(f"wall time: {time.perf_counter() - started:.0f} s")
    if failed:
        print(f"{len(failed)} check(s) failed: {'; '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
