"""What careless or hostile callers cost everyone else, against the real server in one run
(issue 17's measurements, re-run):

1. GetJob latency while a job runs, with no watcher and with ``--watchers`` open WatchJob
   streams on that job (median of ``--calls`` calls; ratio).
2. Cancel latency of a running job that reports every optimisation step: CancelJob to the
   CANCELLED state.
3. A job on the base right after an abandoned Generate (client deadline 0.5 s, 512 new tokens)
   against the same job with no Generate before it (wall time to SUCCEEDED; ratio).

    .venv/bin/python benchmarks/hostile_load.py [--base smollm2-135m] [--watchers 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from modelsurgery.client import Client
from modelsurgery.client.errors import ModelSurgeryError
from modelsurgery.models.hardware import describe
from modelsurgery.server.process import start_server
from modelsurgery.v1 import jobs_pb2

RUNNING = jobs_pb2.JOB_STATE_RUNNING


def quick_spec(base: str, head: str) -> dict:
    return {"base": base, "operations": [{"method": "mask_heads", "heads": [head]}]}


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
    def watch() -> None:
        with Client(address, timeout=600) as client:
            for _ in client.watch(job_id):
                pass

    threads = [threading.Thread(target=watch, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def job_seconds(client: Client, spec: dict) -> tuple[float, jobs_pb2.Job]:
    start = time.perf_counter()
    job = client.wait(client.submit(spec).id, timeout=600)
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
    return time.perf_counter() - start, job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--watchers", type=int, default=200)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    print(describe())
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp) / "home")
        try:
            with Client(server.address, timeout=120) as client:
                _, warm = job_seconds(client, quick_spec(args.base, "0.0"))  # loads the base
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

                plain, _ = job_seconds(client, quick_spec(args.base, "1.1"))
                try:
                    client.generate(root, ["Once upon a time"], max_new_tokens=512, timeout=0.5)
                except ModelSurgeryError as exc:
                    print(f"abandoned Generate: {type(exc).__name__}")
                after, _ = job_seconds(client, quick_spec(args.base, "1.2"))
                print(
                    f"job after an abandoned Generate: {after:.2f} s vs {plain:.2f} s without: "
                    f"ratio {after / plain:.2f}x"
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
