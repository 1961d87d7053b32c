"""``modelsurgery batch``: one spec fanned out over many bases or fact sets, every item's
outcome reported (table, --json, --junit) and the exit code of the worst of them."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from modelsurgery.client.batch import (
    BatchItem,
    BatchResult,
    over_bases,
    over_fact_sets,
    read_facts,
    refused,
    run_batch,
)
from modelsurgery.client.cli_common import (
    EXIT_INFRASTRUCTURE,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_TIMEOUT,
    CaOption,
    JsonOption,
    Reported,
    ServerOption,
    TokenOption,
    classify,
    connect,
    count_progress,
    emit_json,
    id_column,
    junit_problem,
    out,
    plain_row,
    reported_errors,
    state_exit_code,
    worst_exit,
)
from modelsurgery.client.connection import as_spec
from modelsurgery.client.junit import ItemCase, Problem, batch_report, write_report
from modelsurgery.proto.job_state import JobState
from modelsurgery.proto.spec import SpecError

SKIPPED = "not submitted: another item is invalid"
# What an item without a job verdict is shown as, by its exit code.
_NO_VERDICT = {EXIT_TIMEOUT: "TIMEOUT", EXIT_INFRASTRUCTURE: "ERROR", EXIT_INVALID: "REFUSED"}


def item_outcome(result: BatchResult) -> tuple[str, int, Problem | None]:
    """(outcome as shown, exit code, JUnit problem or None) of one item."""
    if result.state is not None:
        state = result.state
        if state is JobState.SUCCEEDED:
            return state, state_exit_code(state), None
        message = f"job ended {state}" + (f": {result.error}" if result.error else "")
        return state, state_exit_code(state), Problem("failure", state, message)
    if result.problem is None:
        return "SKIPPED", EXIT_OK, Problem("skipped", "skipped", result.error)
    reported = classify(result.problem)
    assert reported is not None
    return _NO_VERDICT.get(reported.exit_code, "ERROR"), reported.exit_code, junit_problem(reported)


def item_data(result: BatchResult) -> dict[str, Any]:
    """One item as --json writes it: the job's figures, or why it has none."""
    outcome, exit_code, _ = item_outcome(result)
    problem = result.problem
    return {
        "label": result.label,
        "job_id": result.job_id or None,
        "state": result.state,
        "outcome": outcome,
        "exit_code": exit_code,
        "version_id": result.version_id,
        "metrics": result.metrics,
        "error": result.error or None,
        "code": problem.code.name if problem is not None else None,
        "field": problem.field if problem is not None else None,
    }


def _summary(result: BatchResult) -> str:
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.metrics.items())[:4])
    field = result.problem.field if result.problem is not None else None
    error = (
        f"{result.error} (field {field})" if field and field not in result.error else result.error
    )
    return shown or error


def _print_table(results: list[BatchResult]) -> None:
    table = Table("item", id_column("job"), "outcome", id_column("version"), "metrics / error")
    for result in results:
        outcome, _, _ = item_outcome(result)
        plain_row(
            table,
            result.label,
            result.job_id or "-",
            outcome,
            result.version_id or "-",
            _summary(result),
        )
    out.print(table)


def _junit(
    results: list[BatchResult], path: Path, name: str, started: datetime, clock: float
) -> None:
    """The JUnit report: a case per item, named by its label."""
    cases = []
    for result in results:
        outcome, _, problem = item_outcome(result)
        where = f"job {result.job_id}: " if result.job_id else ""
        cases.append(ItemCase(result.label, f"{where}{outcome} {_summary(result)}", problem))
    seconds = time.monotonic() - clock
    write_report(batch_report(cases, name, started=started, seconds=seconds), path)


def _items(
    template_path: Path, bases: list[str] | None, facts: Path | None, per_job: int
) -> list[BatchItem]:
    """Every item of the batch, each validated (a refused one carries its error)."""
    template = as_spec(template_path)
    if bool(bases) == (facts is not None):
        raise SpecError("batch", "give either --base (repeatable) or --facts")
    if bases:
        return over_bases(template, bases)
    return over_fact_sets(template, read_facts(facts), per_job)  # type: ignore[arg-type]


def register_batch_command(app: typer.Typer) -> None:
    @app.command()
    def batch(
        spec: Annotated[Path, typer.Argument(help="Job spec (YAML) to fan out.", exists=True)],
        base: Annotated[
            list[str] | None,
            typer.Option(help="Run the spec on each of these bases (repeatable)."),
        ] = None,
        facts: Annotated[
            Path | None,
            typer.Option(help="JSONL (or JSON list) of facts, split over jobs (rome/memit specs)."),
        ] = None,
        facts_per_job: Annotated[
            int, typer.Option(min=1, help="Facts per job with --facts.")
        ] = 500,
        concurrency: Annotated[int, typer.Option(min=1, help="Jobs in flight at once.")] = 4,
        name: Annotated[
            str | None,
            typer.Option(help="Batch name (request ids derive from it; re-runs reuse)."),
        ] = None,
        timeout: Annotated[
            float | None,
            typer.Option(
                min=0,
                help="Stop waiting after this many seconds: items not ended by then are "
                "TIMEOUT (exit 5); their jobs go on.",
            ),
        ] = None,
        junit: Annotated[
            Path | None, typer.Option(help="Write a JUnit XML report: a case per item.")
        ] = None,
        as_json: JsonOption = False,
        server: ServerOption = None,
        token: TokenOption = None,
        tls_ca: CaOption = None,
    ) -> None:
        """Fan a spec out over many bases or fact sets as parallel jobs; report each item.

        Every item is validated before any is submitted (one invalid item: none is
        submitted); an item the server refuses does not stop the others.

        Exit code: the worst item's, in this order: 4 (server unreachable or an error on its
        side), 2 (refused), 5 (timed out), 1 (failed), 3 (cancelled), 0 (every job succeeded).
        """
        started, clock = datetime.now(UTC), time.monotonic()
        suite = name or spec.stem

        def record(reported: Reported) -> None:
            """A batch that stops before its items ran still leaves its report."""
            if junit is not None:
                case = ItemCase("batch", reported.message, junit_problem(reported))
                seconds = time.monotonic() - clock
                write_report(batch_report([case], suite, started=started, seconds=seconds), junit)

        with reported_errors(as_json, on_error=record):
            items = _items(spec, base, facts, facts_per_job)
            if any(item.refused is not None for item in items):
                results = [
                    refused(item)
                    if item.refused is not None
                    else BatchResult(item.label, error=SKIPPED)
                    for item in items
                ]
            else:
                with (
                    connect(server, token, tls_ca) as client,
                    count_progress("jobs", not as_json) as bar,
                ):
                    done = 0

                    def update(result: BatchResult) -> None:
                        nonlocal done
                        done += 1
                        bar(done, len(items))

                    results = run_batch(
                        client,
                        items,
                        concurrency=concurrency,
                        batch_name=suite,
                        timeout=timeout,
                        on_update=update,
                    )
        if junit is not None:
            _junit(results, junit, suite, started, clock)
        if as_json:
            emit_json([item_data(r) for r in results])
        else:
            _print_table(results)
        raise typer.Exit(worst_exit(item_outcome(r)[1] for r in results))
