"""Default prune jobs through `modelsurgery apply --local` on SmolLM2-135M, and the reference's
time on the same calibration windows, in one run.

    .venv/bin/python benchmarks/prune_jobs.py --wanda-checkout /tmp/wanda [--threads 2]

Jobs, as a user submits them, defaults only: structured 20% (`kind: structured`, `ratio: 0.2`)
and Wanda 50% (`method: prune`), 2:4 with its default (score and refit) and 2:4 with
`score: wanda` (plain Wanda, no refit), whose job seconds are printed as a ratio; on request
(``--only``) the default 2:4 job with ``refit_inputs`` pinned to ``pruned`` or ``dense``, each
also printed over the Wanda job;
``--calibration-dtype`` pins that one field instead, to time
the dtype ``auto`` did not choose. Each is a fresh `apply --local --new --json` in a child
process with its own MODELSURGERY_HOME, so its wall seconds include starting Ray, loading and
importing the model, as a user waits for them. Printed per job: wall seconds, the job's
`job_seconds` and `prune_seconds`, the calibration dtype its version recorded and the
perplexity ratio. With ``--wanda-checkout`` (a clone of locuslab/wanda; never vendored) that
repository's own `prune_wanda` then runs in this process on the same 128 x 512 windows, and
the Wanda job's `prune_seconds` is printed over the reference's seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.evaluation.perplexity import wikitext_perplexity
from modelsurgery.models import load
from modelsurgery.models.hardware import describe
from modelsurgery.pruning.calibration import calibration_ids
from modelsurgery.pruning.config import PruneConfig
from pruning import reference_prune

JOBS = {
    "structured-20": {"method": "prune", "kind": "structured", "ratio": 0.2},
    "wanda-50": {"method": "prune"},
    "nm-2:4": {"method": "prune", "kind": "nm", "n": 2, "m": 4},
    "nm-2:4-wanda": {"method": "prune", "kind": "nm", "n": 2, "m": 4, "score": "wanda"},
    "nm-2:4-pruned": {"method": "prune", "kind": "nm", "n": 2, "m": 4, "refit_inputs": "pruned"},
    "nm-2:4-dense": {"method": "prune", "kind": "nm", "n": 2, "m": 4, "refit_inputs": "dense"},
}
REFIT_JOBS = ("nm-2:4", "nm-2:4-pruned", "nm-2:4-dense")
ON_REQUEST = ("nm-2:4-pruned", "nm-2:4-dense")


def run_job(name: str, operation: dict[str, object], home: Path) -> dict[str, object]:
    """One `apply --local` job in a child process; its summary plus what the version recorded."""
    spec = home / f"{name}.yaml"
    spec.write_text(json.dumps({"base": "smollm2-135m", "operations": [operation]}))
    command = [sys.executable, "-m", "modelsurgery.client.cli", "apply", str(spec)]
    start = time.perf_counter()
    done = subprocess.run(
        [*command, "--local", "--new", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "MODELSURGERY_HOME": str(home)},
        check=False,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{name}: apply exited {done.returncode}\n{done.stderr[-3000:]}")
    try:
        summary = json.loads(done.stdout)
    except json.JSONDecodeError as err:
        output = f"stdout {done.stdout[-1000:]!r}\n{done.stderr[-3000:]}"
        raise RuntimeError(f"{name}: apply printed no JSON summary\n{output}") from err
    recorded = CheckpointStore(home / "store").get(summary["version_id"]).operations[-1]
    return {"wall": wall, "metrics": summary["metrics"], "operation": recorded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wanda-checkout", type=Path, help="locuslab/wanda clone (side by side)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    default_jobs = [name for name in JOBS if name not in ON_REQUEST]
    parser.add_argument("--only", nargs="*", choices=list(JOBS), default=default_jobs)
    parser.add_argument(
        "--calibration-dtype",
        choices=["float32", "bfloat16"],
        help="set it in the jobs' spec instead of leaving the default (auto)",
    )
    args = parser.parse_args()
    pinned = {"calibration_dtype": args.calibration_dtype} if args.calibration_dtype else {}
    torch.set_num_threads(args.threads)
    print(describe(), flush=True)

    results = {}
    for name in args.only:
        with tempfile.TemporaryDirectory(prefix=f"prune-job-{name}-") as home:
            results[name] = run_job(name, {**JOBS[name], **pinned}, Path(home))
        r = results[name]
        m = r["metrics"]
        print(
            f"{name}: wall {r['wall']:.1f} s, job_seconds {m['job_seconds']:.1f}, "
            f"op0.prune_seconds {m['op0.prune_seconds']:.1f}, calibration_dtype "
            f"{r['operation']['calibration_dtype']}, perplexity_ratio {m['perplexity_ratio']:.4f}",
            flush=True,
        )

    for name in [n for n in REFIT_JOBS if n in results and "nm-2:4-wanda" in results]:
        refit, wanda = (results[n]["metrics"] for n in (name, "nm-2:4-wanda"))
        job = refit["job_seconds"] / wanda["job_seconds"]
        prune = refit["op0.prune_seconds"] / wanda["op0.prune_seconds"]
        print(f"{name} / nm-2:4-wanda: job_seconds {job:.2f}x, prune_seconds {prune:.2f}x")

    if args.wanda_checkout and "wanda-50" in results:
        defaults = PruneConfig()
        loaded = load("smollm2-135m")
        ids = calibration_ids(
            loaded.tokenizer,
            samples=defaults.calibration_samples,
            seqlen=defaults.calibration_seqlen,
            seed=defaults.seed,
            data=None,
            data_roots=(),
        )
        dense = wikitext_perplexity(loaded.model, loaded.tokenizer)
        seconds = reference_prune(
            args.wanda_checkout, "prune_wanda", loaded.model, ids, {"ratio": 0.5}
        )
        ratio = wikitext_perplexity(loaded.model, loaded.tokenizer) / dense
        ours = float(results["wanda-50"]["metrics"]["op0.prune_seconds"])
        print(
            f"locuslab/wanda prune_wanda, same {ids.shape[0]} x {ids.shape[1]} windows: "
            f"{seconds:.1f} s, perplexity_ratio {ratio:.4f}; "
            f"job prune_seconds / reference {ours / seconds:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
