"""Service overheads, measured against the real server process in one run.

1. Download throughput: DownloadVersion of the base model's exported folder over loopback (MB/s,
   sha256 of every file checked) beside reading the same files from disk in the same run (warm
   page cache), as a ratio. The first download also builds the export (and its digests); it is
   reported on its own, the ratio uses the downloads after it (median of ``--repeat``).
2. Submit-to-start latency with a warm actor: after a warm-up job has loaded the base model,
   the time from SubmitJob to the job's RUNNING event (server clock) and to the client seeing it.

    .venv/bin/python benchmarks/service.py [--base smollm2-135m] [--jobs 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from modelsurgery.client import Client
from modelsurgery.models.hardware import describe
from modelsurgery.server.process import start_server
from modelsurgery.v1 import jobs_pb2

BLOCK = 1 << 20


def folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def read_folder(folder: Path) -> int:
    """Read every file in 1 MiB blocks: the disk side of the ratio."""
    total = 0
    for path in folder_files(folder):
        with path.open("rb") as handle:
            while block := handle.read(BLOCK):
                total += len(block)
    return total


def hash_folder(folder: Path) -> int:
    """Read and sha256 every file: the least a verified copy has to do, for reference."""
    total = 0
    for path in folder_files(folder):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while block := handle.read(BLOCK):
                digest.update(block)
                total += len(block)
    return total


def timed(action, *args) -> float:
    start = time.perf_counter()
    action(*args)
    return time.perf_counter() - start


def mask_spec(base: str, head: str) -> dict:
    return {"base": base, "operations": [{"method": "mask_heads", "heads": [head]}]}


def download_figures(client: Client, home: Path, base: str, repeat: int) -> None:
    start = time.perf_counter()
    version = client.import_model(base)
    print(f"import {base}: {time.perf_counter() - start:.1f} s (version {version.id})")
    export_dir = home / "exports" / version.id
    target = home / "download"
    first = timed(client.download, version.id, target)
    mb = read_folder(export_dir) / 1e6
    print(f"first download (builds the export and its digests): {mb:.1f} MB in {first:.2f} s")
    disk, hashed, download = [], [], []
    for _ in range(repeat):
        shutil.rmtree(target)
        disk.append(timed(read_folder, export_dir))
        hashed.append(timed(hash_folder, export_dir))
        download.append(timed(client.download, version.id, target))
    disk_s, hash_s, download_s = (statistics.median(t) for t in (disk, hashed, download))
    print(f"disk read of the same files (warm cache): {mb / disk_s:.1f} MB/s (median of {repeat})")
    print(f"disk read + sha256 of the same files: {mb / hash_s:.1f} MB/s")
    print(
        f"download over loopback (export cached, sha256 of every file checked): "
        f"{mb / download_s:.1f} MB/s (runs: {', '.join(f'{mb / t:.0f}' for t in download)})"
    )
    print(f"download/disk throughput ratio: {disk_s / download_s:.3f}")
    print(f"download/(disk read + sha256) ratio: {hash_s / download_s:.3f}")
    shutil.rmtree(target)


def latency_figures(client: Client, base: str, jobs: int) -> None:
    warm = client.wait(client.submit(mask_spec(base, "0.0")).id)
    if warm.state != jobs_pb2.JOB_STATE_SUCCEEDED:
        raise SystemExit(f"warm-up job failed: {warm.error}")
    server_side, client_side = [], []
    for i in range(jobs):
        sent = time.time()
        job = client.submit(mask_spec(base, f"{i % 2}.{i % 4}"))
        seen = None
        for event in client.watch(job.id):
            if seen is None and event.message.startswith("attempt"):
                seen = time.time()
        done = client.get_job(job.id)
        server_side.append(
            done.started.ToMicroseconds() / 1e6 - done.created.ToMicroseconds() / 1e6
        )
        client_side.append((seen or time.time()) - sent)
    print(
        f"submit-to-start, server clock (created -> RUNNING), {jobs} jobs: "
        f"median {statistics.median(server_side) * 1e3:.1f} ms, "
        f"max {max(server_side) * 1e3:.1f} ms"
    )
    print(
        f"submit-to-start, client sees RUNNING event: "
        f"median {statistics.median(client_side) * 1e3:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--jobs", type=int, default=10, help="latency jobs (0: downloads only)")
    parser.add_argument("--repeat", type=int, default=3, help="timed downloads and disk reads")
    args = parser.parse_args()
    print(describe(), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        server = start_server(home)
        try:
            with Client(server.address, timeout=600) as client:
                download_figures(client, home, args.base, args.repeat)
                if args.jobs:
                    latency_figures(client, args.base, args.jobs)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
