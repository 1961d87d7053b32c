"""How long the thin client takes to start: what every CLI call and CI step pays first.

Each figure is the wall time of a fresh subprocess (interpreter start included), best of N,
and its CPU time (user + system; what a loaded CI runner pays), least of N:
``modelsurgery --help`` and ``--version`` (the console script beside this interpreter),
``import modelsurgery.client`` and parsing examples/safety-patch.yaml (rome + mask_heads +
gates). A run that exits non-zero is marked.

    .venv/bin/python benchmarks/cli_startup.py            # best of 5
    .venv/bin/python benchmarks/cli_startup.py --runs 10
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

SPEC = Path(__file__).resolve().parent.parent / "examples" / "safety-patch.yaml"


def commands() -> dict[str, list[str]]:
    python = sys.executable
    cli = str(Path(python).parent / "modelsurgery")
    return {
        "--help": [cli, "--help"],
        "--version": [cli, "--version"],
        "import modelsurgery.client": [python, "-c", "import modelsurgery.client"],
        "spec parse": [
            python,
            "-c",
            f"from modelsurgery.proto.spec import load_spec_file; load_spec_file({str(SPEC)!r})",
        ],
    }


def best_of(command: list[str], runs: int) -> tuple[float, float, int]:
    """The least wall and CPU seconds of ``runs`` runs, and the last run's exit status."""
    walls, cpus = [], []
    status = 0
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        status = subprocess.run(command, capture_output=True, check=False).returncode
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return min(walls), min(cpus), status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"{'command':<28} {'wall s':>7} {'cpu s':>7}  (least of {args.runs}, fresh subprocess)")
    for name, command in commands().items():
        wall, cpu, status = best_of(command, args.runs)
        note = "" if status == 0 else f"  exit {status}"
        print(f"{name:<28} {wall:>7.3f} {cpu:>7.3f}{note}")


if __name__ == "__main__":
    main()
