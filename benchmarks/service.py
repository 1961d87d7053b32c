"""Service overheads, measured against the real server process in one run.

1. Submit-to-start latency with a warm actor: after a warm-up job has loaded the base model,
   the time from SubmitJob to the job's RUNNING event (server clock) and to the client seeing it.
2. Download throughput: DownloadVersion of an exported version (MB/s) against reading the same
   files from disk, as a ratio.

    .venv/bin/python benchmarks/service.py [--base smollm2-135m] [--jobs 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from modelsurgery.client import Client
from modelsurgery.models.hardware import describe
from modelsurgery.server.process import start_server
from modelsurgery.v1 import jobs_pb2


def read_folder(folder: Path) -> int:
    total = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                total += len(block)
    return total


def mask_spec(base: str, head: str) -> dict:
    return {"base": base, "operations": [{"method": "mask_heads", "heads": [head]}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--jobs", type=int, default=10)
    args = parser.parse_args()
    print(describe(), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        server = start_server(home)
        try:
            with Client(server.address, timeout=600) as client:
                warm = client.wait(client.submit(mask_spec(args.base, "0.0")).id)
                if warm.state != jobs_pb2.JOB_STATE_SUCCEEDED:
                    raise SystemExit(f"warm-up job failed: {warm.error}")
                server_side, client_side = [], []
                for i in range(args.jobs):
                    sent = time.time()
                    job = client.submit(mask_spec(args.base, f"{i % 2}.{i % 4}"))
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
                    f"submit-to-start, server clock (created -> RUNNING), {args.jobs} jobs: "
                    f"median {statistics.median(server_side) * 1e3:.1f} ms, "
                    f"max {max(server_side) * 1e3:.1f} ms"
                )
                print(
                    f"submit-to-start, client sees RUNNING event: "
                    f"median {statistics.median(client_side) * 1e3:.1f} ms"
                )

                export_dir = home / "exports" / warm.version_id
                target = Path(tmp) / "download"
                start = time.perf_counter()
                client.download(warm.version_id, target, chunk_size=2 << 20)
                download_s = time.perf_counter() - start
                start = time.perf_counter()
                size = read_folder(export_dir)
                disk_s = time.perf_counter() - start
                mb = size / 1e6
                print(
                    f"download: {mb:.1f} MB in {download_s:.2f} s = {mb / download_s:.1f} MB/s "
                    f"(includes sha256 check of every file)"
                )
                print(f"disk read of the same files: {disk_s:.3f} s = {mb / disk_s:.1f} MB/s")
                print(f"download/disk throughput ratio: {(mb / download_s) / (mb / disk_s):.3f}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
