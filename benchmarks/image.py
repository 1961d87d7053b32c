"""The server image's size and how long a container takes from ``docker run`` to serving:
to the first SERVING answer of a health probe from the host, and to Docker's own HEALTHCHECK
reporting it healthy (which polls every 10 s, so it trails the first by up to that).

Each run starts a fresh container of the image as ``make test-docker`` does (uid 10001 under
tini, host network, a free loopback port, tokens, the shared data mounted read-only, a fresh
home), waits, and removes it; runs are one at a time.

    ../shared/tools/docker-here      # on this workplace's machines: a daemon and a torch index
    TORCH_INDEX_URL=http://127.0.0.1:8765/simple .venv/bin/python benchmarks/image.py --build
    .venv/bin/python benchmarks/image.py --runs 3          # an image built already
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
from pathlib import Path

# The docker test's harness (tests/docker/harness.py) starts the containers.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from docker.harness import (
    DATA_IN_IMAGE,
    build_image,
    daemon_problem,
    docker,
    image_size,
    image_tag,
    start_container,
    wait_healthy,
)

from modelsurgery.editing.data import shared_data_dir
from modelsurgery.models.hardware import describe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=image_tag())
    parser.add_argument("--build", action="store_true", help="build the image first")
    parser.add_argument("--runs", type=int, default=3, choices=range(1, 21), metavar="1..20")
    args = parser.parse_args()
    problem = daemon_problem()
    if problem:
        sys.exit(problem)
    if args.build:
        print(f"build: {build_image(args.image):.0f} s")
    print(f"device: {describe()}; docker {docker('version', '--format', '{{.Server.Version}}')}")
    print(f"image {args.image}: {image_size(args.image) / 1e6:.0f} MB; layers over 1 MB:")
    history = docker(
        "history",
        "--human=false",
        "--no-trunc",
        "--format",
        "{{.Size}}\t{{.CreatedBy}}",
        args.image,
    )
    for line in history.splitlines():
        size, _, created_by = line.partition("\t")
        step = created_by.removeprefix("/bin/sh -c ").removeprefix("#(nop) ") or "base image"
        if int(size) > 1e6:
            print(f"  {int(size) / 1e6:>7.0f} MB  {step[:70]}")
    print(f"{'run':<6} {'serving s':>10} {'healthy s':>10}")
    serving, healthy = [], []
    for run in range(1, args.runs + 1):
        container = start_container(
            args.image,
            env={"MODELSURGERY_TOKENS": f"bench:{secrets.token_hex(16)}"},
            mounts={shared_data_dir(): DATA_IN_IMAGE},
        )
        try:
            startup = wait_healthy(container)
        finally:
            container.remove()
        serving.append(startup.serving_s)
        healthy.append(startup.healthy_s)
        print(f"{run:<6} {startup.serving_s:>10.1f} {startup.healthy_s:>10.1f}")
    print(f"{'median':<6} {statistics.median(serving):>10.1f} {statistics.median(healthy):>10.1f}")


if __name__ == "__main__":
    main()
