"""The whole story on the embedded default (`make demo`): start the server with embedded Ray,
apply the example safety patch to SmolLM2-135M (facts rewritten, heads masked, gates checked),
show the model's answers before and after, print the new version's lineage, stop the server.

State lives in $MODELSURGERY_HOME (default ~/.modelsurgery); a second run reuses the stored
base and returns the same job and version without new work.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from modelsurgery.client import Client
from modelsurgery.proto.job_state import JobState
from modelsurgery.proto.spec import load_spec_file
from modelsurgery.server.process import start_server
from modelsurgery.v1 import jobs_pb2

PATCH = Path(__file__).with_name("safety-patch.yaml")
console = Console()


def home() -> Path:
    env = os.environ.get("MODELSURGERY_HOME")
    return Path(env) if env else Path.home() / ".modelsurgery"


def prompts_of(spec_path: Path) -> list[str]:
    """Each fact's prompt and rephrase, with the subject filled in."""
    spec = load_spec_file(spec_path)
    prompts = []
    for operation in spec.operations:
        for fact in getattr(operation, "facts", []):
            prompts.append(fact.prompt.replace("{}", fact.subject))
            prompts.extend(fact.rephrase_prompts)
    return prompts


def print_event(event: jobs_pb2.JobEvent) -> None:
    fields = json_format.MessageToDict(event.fields)
    step = f" {int(fields['step'])}/{int(fields['total'])}" if "total" in fields else ""
    console.print(f"  [dim]{event.seq:>3}[/dim] {event.message}{step}")


def main() -> int:
    console.rule("modelsurgery demo")
    server = start_server(home())
    console.print(f"server up on {server.address} (embedded Ray), logs: {server.log}")
    try:
        with Client(server.address, timeout=900) as client:
            console.print("importing smollm2-135m into the store ...")
            base = client.import_model("smollm2-135m", alias="smollm2-base")
            console.print(f"base version {base.id}")
            prompts = prompts_of(PATCH)
            before = client.generate(base.id, prompts, max_new_tokens=6)

            console.print(f"applying {PATCH.name} ...")
            job = client.submit(PATCH, request_id=client.patch_request_id(PATCH))
            job = client.wait(job.id, progress=print_event)
            state = JobState.from_proto(job.state)
            gates = Table("gate", "condition", "value", "result", title=f"job {job.id}: {state}")
            for gate in job.gates:
                value = f"{gate.value:.4g}" if gate.has_value else "-"
                gates.add_row(gate.metric, gate.condition, value, "pass" if gate.passed else "FAIL")
            console.print(gates)
            if not job.version_id:
                console.print(f"[red]nothing published: {job.error}[/red]")
                return 1

            after = client.generate(job.version_id, prompts, max_new_tokens=6)
            answers = Table("prompt", "before", "after", title="greedy answers")
            for prompt, old, new in zip(prompts, before, after, strict=True):
                answers.add_row(prompt, old.strip(), new.strip())
            console.print(answers)

            info = client.get_version(job.version_id)
            console.print(f"new version {job.version_id} (aliases: {', '.join(info.aliases)})")
            console.print("lineage: " + " <- ".join(info.lineage))
            console.print(
                "metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(job.metrics.items()))
            )
    finally:
        server.stop()
        console.print("server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
