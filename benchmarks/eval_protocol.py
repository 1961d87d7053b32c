"""A job's evaluation cost, this tree against an earlier commit, side by side in one run: the
same one-operation MEMIT job on SmolLM2-135M (CounterFact dev cases, fact figures and WikiText-2
perplexity, the default 4,096-token protocol) through ``execute_job`` on a fresh store, each tree
in its own process, alternating.

    python benchmarks/eval_protocol.py --baseline 53f8ced --facts 20 --repeats 3

The baseline is checked out with ``git worktree`` into a temporary folder (its gRPC stubs
generated there, nothing committed) and imported through a temporary ``modelsurgery`` package
of links. Prints the device, one JSON line per run, then each figure's median and the ratio
this tree / baseline. The baseline's ``eval_seconds`` counted only its job-level evaluation (its
operation measured its own figures inside the method), so both trees are also timed the same
way from outside: ``measure_seconds`` is the time spent in ``score_facts`` and
``wikitext_perplexity`` (cProfile, by function name, in both trees), ``fact_passes`` how often
facts were scored.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "proto": "proto",
    "v1": "proto/modelsurgery/v1",
    "models": "models",
    "checkpoints": "checkpoints",
    "editing": "editing",
    "evaluation": "evaluation",
    "pruning": "pruning",
    "server": "server",
    "client": "client",
}
FIGURES = ("measure_seconds", "fact_passes", "eval_seconds", "job_seconds", "efficacy")
MEASURING = ("score_facts", "wikitext_perplexity")


def run_job(facts: int, offset: int, threads: int) -> dict[str, Any]:
    """The job in this process, with whatever ``modelsurgery`` is importable."""
    import torch

    from modelsurgery.checkpoints import CheckpointStore
    from modelsurgery.editing.data import shared_data_path
    from modelsurgery.models.hardware import describe
    from modelsurgery.server.executor import WorkerSettings, execute_job
    from modelsurgery.server.model_cache import ModelCache

    torch.set_num_threads(threads)
    records = json.loads(shared_data_path("counterfact/counterfact-dev.json").read_text())
    spec = {
        "base": "smollm2-135m",
        "operations": [
            {"method": "memit", "facts": records[offset : offset + facts], "v_steps": 5}
        ],
    }
    profile = cProfile.Profile()
    with tempfile.TemporaryDirectory(prefix="eval-protocol-") as tmp:
        settings = WorkerSettings(store_root=Path(tmp) / "store", cache_dir=Path(tmp) / "cache")
        outcome = profile.runcall(
            execute_job,
            spec,
            store=CheckpointStore(settings.store_root),
            cache=ModelCache(8 << 30),
            settings=settings,
            emit=lambda event: None,
            is_cancelled=lambda: False,
        )
    # (file, line, name) -> (calls, ..., cumulative seconds, ...)
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    measured = {key[2]: value for key, value in stats.items() if key[2] in MEASURING}
    metrics = dict(outcome.metrics)
    return {
        "device": describe(torch.device("cpu")),
        "state": str(outcome.state),
        "measure_seconds": sum(value[3] for value in measured.values()),
        "fact_passes": measured.get("score_facts", (0,))[0],
        **{name: metrics[name] for name in ("eval_seconds", "job_seconds", "efficacy")},
        "op0.efficacy": metrics.get("op0.efficacy"),
    }


def baseline_tree(revision: str, into: Path) -> Path:
    """A checkout of ``revision`` with its stubs, and a folder whose ``modelsurgery`` links to
    it the way pyproject's package-dir maps the installed package."""
    checkout = into / "checkout"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(checkout), revision],
        check=True,
        capture_output=True,
    )
    from grpc_tools import protoc

    proto = checkout / "proto"
    include = str(Path(protoc.__file__).parent / "_proto")
    protos = sorted(str(p.relative_to(proto)) for p in proto.rglob("*.proto"))
    args = ["protoc", f"-I{proto}", f"-I{include}", f"--python_out={proto}"]
    if protoc.main([*args, f"--grpc_python_out={proto}", *protos]) != 0:
        raise RuntimeError("protoc failed on the baseline's protos")
    package = into / "path" / "modelsurgery"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name, folder in PACKAGES.items():
        (package / name).symlink_to(checkout / folder)
    return into / "path"


def child(path: Path | None, args: argparse.Namespace) -> dict[str, Any]:
    from modelsurgery.editing.data import DATA_ENV, shared_data_dir

    env = {**os.environ, DATA_ENV: str(shared_data_dir())}
    if path is not None:
        env["PYTHONPATH"] = str(path)
    command = [sys.executable, __file__, "--child", "--facts", str(args.facts)]
    command += ["--offset", str(args.offset), "--threads", str(args.threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="53f8ced", help="git revision to compare with")
    parser.add_argument("--facts", type=int, default=20)
    parser.add_argument("--offset", type=int, default=2000, help="first CounterFact dev case")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_job(args.facts, args.offset, args.threads)))
        return
    with tempfile.TemporaryDirectory(prefix="eval-baseline-") as tmp:
        path = baseline_tree(args.baseline, Path(tmp))
        try:
            runs: dict[str, list[dict[str, Any]]] = {"this tree": [], args.baseline: []}
            for _ in range(args.repeats):
                for name, where in (("this tree", None), (args.baseline, path)):
                    result = child(where, args)
                    runs[name].append(result)
                    print(json.dumps({"tree": name, **result}), flush=True)
        finally:
            subprocess.run(
                [
                    "git",
                    "-C",
                    str(ROOT),
                    "worktree",
                    "remove",
                    "--force",
                    str(path.parent / "checkout"),
                ],
                check=False,
            )
    print(f"device: {runs['this tree'][0]['device']}")
    for figure in FIGURES:
        ours = statistics.median(r[figure] for r in runs["this tree"])
        theirs = statistics.median(r[figure] for r in runs[args.baseline])
        ratio = ours / theirs
        print(f"{figure}: this tree {ours:.4g}, {args.baseline} {theirs:.4g}, ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
