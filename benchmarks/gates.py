"""Gates on the final model and lineage regression, against the real server on SmolLM2-135M.

1. Two maskings in one job, each measuring its own perplexity, gated on
   ``perplexity_ratio <= 1.05``: the gate sees the final model against the base (it should
   fail at about 1.07), not the second masking against the first.
2. A chain of single-fact ROME jobs, each on the previous job's version (CounterFact dev
   cases ``--offset`` .. ``--offset + --chain - 1``): per job its own efficacy / locality and
   the ``lineage_*`` re-check of every earlier fact on the final model; then ``eval`` of the
   last version, which must reproduce its job's numbers.

    .venv/bin/python benchmarks/gates.py [--chain 10] [--offset 0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from modelsurgery.client import Client
from modelsurgery.editing.data import shared_data_path
from modelsurgery.models.hardware import describe
from modelsurgery.proto.job_state import JobState
from modelsurgery.server.process import start_server

SHOWN = ("efficacy", "paraphrase", "locality", "perplexity_ratio")
LINEAGE = ("lineage_facts", "lineage_efficacy", "lineage_paraphrase", "lineage_locality")


def two_maskings(client: Client) -> None:
    spec = {
        "base": "smollm2-135m",
        "operations": [
            {
                "method": "mask_heads",
                "heads": ["3.1", "5.2", "9.0", "12.3"],
                "evaluate_perplexity": True,
            },
            {"method": "mask_heads", "heads": ["7.4"], "evaluate_perplexity": True},
        ],
        "gates": {"perplexity_ratio": "<= 1.05"},
    }
    job = client.wait(client.submit(spec).id)
    m, state = job.metrics, JobState.from_proto(job.state)
    print(
        f"two maskings: {state}; perplexity base {m['perplexity_base']:.3f} -> final "
        f"{m['perplexity']:.3f}, perplexity_ratio {m['perplexity_ratio']:.4f} (op1's own ratio "
        f"{m['op1.perplexity_ratio']:.4f}); heads op0 {m['op0.heads_masked']:.0f} + op1 "
        f"{m['op1.heads_masked']:.0f}; eval_seconds {m['eval_seconds']:.2f}",
        flush=True,
    )


def rome_chain(client: Client, cases: list[dict], base: str) -> str:
    version = base
    for i, case in enumerate(cases):
        spec = {"base": version, "operations": [{"method": "rome", "facts": [case]}]}
        job = client.wait(client.submit(spec).id)
        if (state := JobState.from_proto(job.state)) is not JobState.SUCCEEDED:
            raise SystemExit(f"job {i} {state}: {job.error}")
        m = job.metrics
        own = " ".join(f"{k} {m[k]:.3f}" for k in SHOWN if k in m)
        lineage = " ".join(f"{k} {m[k]:.3f}" for k in LINEAGE if k in m)
        print(
            f"job {i + 1:>2} (case {case['case_id']}): {own} | {lineage or 'no lineage yet'} | "
            f"eval_seconds {m['eval_seconds']:.2f} job_seconds {m['job_seconds']:.1f}",
            flush=True,
        )
        version, last = job.version_id, dict(m)
    again = client.evaluate(version)
    worst = max(abs(again.metrics[k] - last[k]) for k in (*SHOWN, *LINEAGE) if k in last)
    print(f"eval {version} against {again.against}: largest difference from its job {worst:.2e}")
    return version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chain", type=int, default=10)
    parser.add_argument("--offset", type=int, default=0)
    args = parser.parse_args()
    print(describe(), flush=True)
    records = json.loads(shared_data_path("counterfact/counterfact-dev.json").read_text())
    cases = records[args.offset : args.offset + args.chain]
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp) / "home")
        try:
            with Client(server.address, timeout=900) as client:
                two_maskings(client)
                base = client.import_model("smollm2-135m").id
                rome_chain(client, cases, base)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
