"""The ``modelsurgery`` command line: serve, apply, jobs, versions, alias, import, generate.

Only the client is imported at start (no torch): commands that run models in this process
import the ML stack inside.
"""

from __future__ import annotations

import json
import os
import uuid
from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from modelsurgery.client.cli_batch import register_batch_command
from modelsurgery.client.cli_common import (
    EXIT_OK,
    CaOption,
    JsonOption,
    Reported,
    ServerOption,
    StoreOption,
    TokenOption,
    connect,
    console,
    emit_json,
    emit_json_line,
    event_data,
    id_column,
    junit_problem,
    out,
    plain_row,
    reported_errors,
    state_exit_code,
)
from modelsurgery.client.cli_concepts import register_concepts_command
from modelsurgery.client.cli_eval import register_eval_command
from modelsurgery.client.cli_methods import register_methods_command
from modelsurgery.client.cli_versions import register_version_commands
from modelsurgery.client.connection import as_spec
from modelsurgery.client.job_progress import JobProgress
from modelsurgery.client.junit import ApplyReport
from modelsurgery.client.sdk import Client
from modelsurgery.proto import limits
from modelsurgery.proto.job_state import JobState
from modelsurgery.proto.spec import SpecError, spec_json_schema
from modelsurgery.v1 import jobs_pb2

app = typer.Typer(
    name="modelsurgery",
    help="Surgery on Hugging Face causal LMs: knowledge edits, ReFT, head masking, pruning.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
jobs_app = typer.Typer(help="Jobs on a server.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
register_version_commands(app)
register_eval_command(app)
register_concepts_command(app)
_STATE_COLORS = {JobState.SUCCEEDED: "green", JobState.FAILED: "red", JobState.CANCELLED: "yellow"}


def _print_version(wanted: bool) -> None:
    if wanted:
        typer.echo(f"modelsurgery {metadata.version('modelsurgery')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """Surgery on Hugging Face causal LMs: knowledge edits, ReFT, head masking, pruning."""


@app.command()
def schema() -> None:
    """Print the JSON Schema of job spec files (an editor validates and completes them)."""
    typer.echo(json.dumps(spec_json_schema(), indent=2))


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 picks a free one).")] = 50051,
    store: StoreOption = None,
    tokens_file: Annotated[
        Path | None, typer.Option(help="Bearer tokens, one per line (name:token).")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Server certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Server private key (PEM).")] = None,
    tls_client_ca: Annotated[
        Path | None, typer.Option(help="CA that client certificates must chain to (mTLS).")
    ] = None,
    model_root: Annotated[
        list[Path] | None,
        typer.Option(
            help="Folders model paths must lie under (repeatable); default: "
            "$MODELSURGERY_HOME/models (built-in aliases, Hub repositories and stored "
            "versions need none)."
        ),
    ] = None,
    data_root: Annotated[
        list[Path] | None,
        typer.Option(
            help="Folders user data files may be read from (repeatable); default: "
            "$MODELSURGERY_HOME/data (shared data sets need none)."
        ),
    ] = None,
    shared_alias: Annotated[
        list[str] | None,
        typer.Option(
            help="Aliases any writer may move (fnmatch pattern, repeatable); others only "
            "their creator or an admin."
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(envvar="RAY_ADDRESS", help="Join this Ray cluster instead of embedding one."),
    ] = None,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of the embedded Ray.")] = None,
    worker_cpus: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="CPUs each worker asks Ray for (default: the cluster's CPUs shared among "
            "the workers, at most what the smallest node has).",
        ),
    ] = None,
    workers: Annotated[int, typer.Option(help="Worker actors (jobs run in parallel).")] = 1,
    gpus_per_worker: Annotated[
        float,
        typer.Option(
            min=0,
            help="GPUs each worker asks Ray for (where the cluster has them); with more than "
            "one, a model that does not fit one GPU is placed layer by layer over them.",
        ),
    ] = 1.0,
    gpu_memory_gib: Annotated[
        float | None,
        typer.Option(
            min=0.1, help="GiB of each GPU a model's weights may fill (default: 85% of its free)."
        ),
    ] = None,
    cpu_offload: Annotated[
        bool,
        typer.Option(
            help="Let layers that fit no GPU stay in CPU memory and run there (slower; "
            "without it such a model is refused)."
        ),
    ] = False,
    fan_out: Annotated[
        int,
        typer.Option(
            min=1,
            help="Helper actors holding the model that one job's v* batches (MEMIT) spread "
            "over; 1 = they run in the job's worker.",
        ),
    ] = 1,
    fan_out_cpus: Annotated[
        float, typer.Option(min=0.1, help="CPUs each fan-out helper asks Ray for.")
    ] = 1.0,
    max_attempts: Annotated[int, typer.Option(help="Attempts per job if a worker dies.")] = 2,
    max_queued: Annotated[int, typer.Option(help="Queued+running jobs per caller.")] = 100,
    max_job_seconds: Annotated[
        float,
        typer.Option(min=1, help="Longest a job may run; a spec's timeout_s may ask for less."),
    ] = limits.DEFAULT_MAX_JOB_SECONDS,
    max_export_bytes: Annotated[
        int,
        typer.Option(min=0, help="Bytes of exported folders kept for downloads (LRU beyond)."),
    ] = limits.DEFAULT_MAX_EXPORT_BYTES,
    job_retention_days: Annotated[
        float,
        typer.Option(
            min=0, help="Delete finished jobs and their events after this many days (0: keep them)."
        ),
    ] = 30.0,
    drain_seconds: Annotated[
        float,
        typer.Option(min=0, help="On SIGTERM, report NOT_SERVING this long before closing."),
    ] = 0.0,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus /metrics on this port.")
    ] = None,
    ready_file: Annotated[
        Path | None, typer.Option(help='Once serving, write {"port", "metrics_port"} JSON here.')
    ] = None,
    text_logs: Annotated[bool, typer.Option(help="Plain text logs instead of JSON.")] = False,
) -> None:
    """Run the gRPC server (embedded Ray unless --ray-address / RAY_ADDRESS)."""
    with reported_errors(False):
        from modelsurgery.checkpoints import default_root
        from modelsurgery.server.app import ServerSettings, run
        from modelsurgery.server.auth import load_tokens, take_env_tokens

        env_tokens = take_env_tokens()
        load_tokens(tokens_file, env_tokens)  # a bad token line ends here, naming the line

    settings = ServerSettings(
        host=host,
        port=port,
        store_root=store or default_root(),
        tokens_file=tokens_file,
        env_tokens=env_tokens,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
        model_roots=tuple(model_root) if model_root else None,
        data_roots=tuple(data_root or ()),
        shared_aliases=tuple(shared_alias or ()),
        ray_address=ray_address,
        num_cpus=num_cpus,
        worker_cpus=worker_cpus,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        gpu_memory_bytes=None if gpu_memory_gib is None else int(gpu_memory_gib * (1 << 30)),
        cpu_offload=cpu_offload,
        fan_out=fan_out,
        fan_out_cpus=fan_out_cpus,
        max_attempts=max_attempts,
        max_queued_per_caller=max_queued,
        max_job_seconds=max_job_seconds,
        max_export_bytes=max_export_bytes,
        job_retention_seconds=job_retention_days * 86400 or None,
        drain_seconds=drain_seconds,
        metrics_port=metrics_port,
    )
    run(settings, ready_file=ready_file, json_logs=not text_logs)


def _job_summary(job: jobs_pb2.Job) -> dict[str, object]:
    return {
        "job_id": job.id,
        "state": JobState.from_proto(job.state),
        "version_id": job.version_id or None,
        "metrics": dict(job.metrics),
        "gates": [
            {
                "metric": g.metric,
                "condition": g.condition,
                "value": g.value if g.has_value else None,
                "passed": g.passed,
            }
            for g in job.gates
        ],
        "error": job.error or None,
        "previous_attempt": job.previous_attempt or None,
        "base": job.spec.base,
        "base_version": job.base_version or None,
        "methods": [op.method for op in job.spec.operations],
        "created": _time(job, "created"),
        "started": _time(job, "started"),
        "finished": _time(job, "finished"),
        "attempts": job.attempts,
    }


def _time(job: jobs_pb2.Job, name: str) -> str | None:
    """A job's timestamp as ISO 8601 (UTC), None when it has not happened."""
    return getattr(job, name).ToJsonString() if job.HasField(name) else None


def _print_job(job: jobs_pb2.Job) -> None:
    state = JobState.from_proto(job.state)
    color = _STATE_COLORS.get(state, "cyan")
    out.print(f"job {escape(job.id)}: [{color}]{state}[/{color}]")
    if job.version_id:
        out.print(f"version {escape(job.version_id)}")
    if job.error:
        out.print(Text(job.error, style="red"))
    if job.metrics:
        table = Table("metric", "value")
        for name, value in sorted(job.metrics.items()):
            plain_row(table, name, f"{value:.6g}")
        out.print(table)
    if job.gates:
        table = Table("gate", "condition", "value", "result")
        for gate in job.gates:
            plain_row(
                table,
                gate.metric,
                gate.condition,
                f"{gate.value:.6g}" if gate.has_value else "not measured",
                Text("pass", style="green") if gate.passed else Text("FAIL", style="red"),
            )
        out.print(table)


def _exit_code(job: jobs_pb2.Job) -> int:
    return state_exit_code(JobState.from_proto(job.state))


def _apply(
    client: Client,
    spec: Path,
    wait: bool,
    as_json: bool,
    request_id: str | None,
    timeout: float | None,
    report: ApplyReport,
) -> int:
    if not spec.is_file():
        raise SpecError("spec", f"{spec} is not a file")
    job_spec = as_spec(spec)
    job = report.job = client.submit(
        job_spec, request_id=request_id or client.patch_request_id(job_spec)
    )
    if not as_json:
        again = f" (re-runs {job.previous_attempt})" if job.previous_attempt else ""
        out.print(escape(f"job {job.id} submitted{again}"))
    if not wait:
        if as_json:
            emit_json(_job_summary(job))
        return EXIT_OK
    with JobProgress(console, quiet=as_json) as progress:
        report.job = job = client.wait(job.id, progress=progress, timeout=timeout)
    if as_json:
        emit_json(_job_summary(job))
    else:
        _print_job(job)
    return _exit_code(job)


@app.command()
def apply(
    spec: Annotated[Path, typer.Argument(help="Job spec (YAML).", dir_okay=False)],
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the job to end.")] = False,
    timeout: Annotated[
        float | None,
        typer.Option(
            min=0, help="Stop waiting after this many seconds (exit 5); the job itself goes on."
        ),
    ] = None,
    local: Annotated[
        bool, typer.Option("--local", help="Run without a server (embedded, in-process).")
    ] = False,
    request_id: Annotated[
        str | None,
        typer.Option(
            help="Idempotency key (default: derived from the spec, so re-running the same "
            "patch on the same base returns the same job and version; a failed or cancelled "
            "one is run again as a new job)."
        ),
    ] = None,
    new: Annotated[
        bool, typer.Option("--new", help="Always start a new job (a random request id).")
    ] = False,
    junit: Annotated[
        Path | None,
        typer.Option(
            help="Write a JUnit XML report on every outcome: a case per gate and one for the "
            "job (implies --wait)."
        ),
    ] = None,
    as_json: JsonOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
    tls_ca: CaOption = None,
    store: StoreOption = None,
) -> None:
    """Submit a job spec; with --wait, follow it to its end.

    Exit codes:
    0  the job succeeded: every gate holds
    1  the job failed, or one of its gates did
    2  invalid spec or usage (the request was refused)
    3  the job was cancelled
    4  server unreachable, or an infrastructure error
    5  --timeout ran out before the job ended
    """
    if new:
        request_id = f"new-{uuid.uuid4().hex}"
    report = ApplyReport(spec.stem)

    def record(reported: Reported) -> None:
        report.problem = junit_problem(reported)

    try:
        with reported_errors(as_json, on_error=record):
            if local:
                from modelsurgery.checkpoints import default_root
                from modelsurgery.server.embedded import EmbeddedServer, local_settings

                root = store or (
                    Path(os.environ["MODELSURGERY_HOME"]) / "store"
                    if os.environ.get("MODELSURGERY_HOME")
                    else default_root()
                )
                settings = local_settings(root, spec, as_spec(spec).base if spec.is_file() else "")
                with (
                    EmbeddedServer(settings) as embedded,
                    Client(embedded.address, timeout=600) as client,
                ):
                    code = _apply(client, spec, True, as_json, request_id, timeout, report)
            else:
                with connect(server, token, tls_ca) as client:
                    waits = wait or junit is not None
                    code = _apply(client, spec, waits, as_json, request_id, timeout, report)
    finally:
        if junit is not None:
            report.write(junit)
    raise typer.Exit(code)


register_batch_command(app)
register_methods_command(app)


@jobs_app.command("list")
def jobs_list(
    state: Annotated[
        list[str] | None, typer.Option(help="Only jobs in this state (repeatable).")
    ] = None,
    as_json: JsonOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
    tls_ca: CaOption = None,
) -> None:
    """List jobs."""
    with reported_errors(as_json), connect(server, token, tls_ca) as client:
        jobs = list(client.list_jobs(state or ()))
        if as_json:
            emit_json([_job_summary(j) for j in jobs])
            return
        table = Table(id_column("job"), "state", "methods", id_column("version"), "error")
        for job in jobs:
            methods = ",".join(op.method for op in job.spec.operations)
            state = JobState.from_proto(job.state)
            plain_row(table, job.id, state, methods, job.version_id, job.error[:60])
        out.print(table)


@jobs_app.command("get")
def jobs_get(
    job_id: str,
    as_json: JsonOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
    tls_ca: CaOption = None,
) -> None:
    """Show one job: state, version, metrics, gates."""
    with reported_errors(as_json), connect(server, token, tls_ca) as client:
        job = client.get_job(job_id)
        if as_json:
            emit_json(_job_summary(job))
        else:
            _print_job(job)


@jobs_app.command("watch")
def jobs_watch(
    job_id: str,
    after: Annotated[int, typer.Option(help="Only events after this sequence number.")] = 0,
    as_json: JsonOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
    tls_ca: CaOption = None,
) -> None:
    """Stream a job's events until it ends; exit with the job's outcome as apply --wait does
    (0 succeeded, 1 failed, 3 cancelled)."""
    with reported_errors(as_json), connect(server, token, tls_ca) as client:
        with JobProgress(console, quiet=as_json) as progress:
            for event in client.watch(job_id, after_seq=after):
                progress(event)
                if as_json:
                    emit_json_line(event_data(event))
        job = client.get_job(job_id)
    raise typer.Exit(_exit_code(job))


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: str,
    as_json: JsonOption = False,
    server: ServerOption = None,
    token: TokenOption = None,
    tls_ca: CaOption = None,
) -> None:
    """Cancel a queued or running job (a running one stops between steps)."""
    with reported_errors(as_json), connect(server, token, tls_ca) as client:
        job = client.cancel(job_id)
        if as_json:
            emit_json(_job_summary(job))
        else:
            out.print(escape(f"job {job.id}: {JobState.from_proto(job.state)} (cancel requested)"))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
