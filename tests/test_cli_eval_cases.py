"""`eval --per-case` prints each judged fact and pair the server returns, failing ones marked,
so a CI log shows which fact broke (a CheckpointService on a loopback port answers with the
cases it was given)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
from typer.testing import CliRunner

from modelsurgery.client.cli import app
from modelsurgery.v1 import checkpoints_pb2, checkpoints_pb2_grpc

CASES = [
    checkpoints_pb2.EvaluationCase(
        suite="facts", index=0, label="Paris -> Rome", figures={"efficacy": 1.0}, passed=True
    ),
    checkpoints_pb2.EvaluationCase(
        suite="facts", index=1, label="Danielle Darrieux -> English", figures={"efficacy": 0.0}
    ),
]


class AnsweredEvaluation(checkpoints_pb2_grpc.CheckpointServiceServicer):
    def __init__(self) -> None:
        self.requests: list[checkpoints_pb2.EvaluateVersionRequest] = []

    def EvaluateVersion(
        self, request: checkpoints_pb2.EvaluateVersionRequest, context: grpc.ServicerContext
    ) -> checkpoints_pb2.EvaluateVersionResponse:
        self.requests.append(request)
        return checkpoints_pb2.EvaluateVersionResponse(
            version_id="v1",
            against="v0",
            metrics={"efficacy": 0.5},
            cases=CASES if request.per_case else [],
        )


@contextmanager
def evaluating() -> Iterator[tuple[str, AnsweredEvaluation]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    service = AnsweredEvaluation()
    checkpoints_pb2_grpc.add_CheckpointServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", service
    finally:
        server.stop(0)


def test_eval_per_case_names_the_fact_that_broke() -> None:
    with evaluating() as (address, service):
        shown = CliRunner().invoke(app, ["eval", "v1", "--per-case", "--server", address])
        as_json = CliRunner().invoke(
            app, ["eval", "v1", "--per-case", "--json", "--server", address]
        )
        plain = CliRunner().invoke(app, ["eval", "v1", "--json", "--server", address])
    assert [r.per_case for r in service.requests] == [True, True, False]
    assert shown.exit_code == 0, shown.output
    broken = [line for line in shown.stdout.splitlines() if "Danielle Darrieux" in line]
    assert len(broken) == 1 and "FAIL" in broken[0] and "efficacy=0" in broken[0]
    cases = json.loads(as_json.stdout)["cases"]
    assert [(c["index"], c["passed"], c["figures"]) for c in cases] == [
        (0, True, {"efficacy": 1.0}),
        (1, False, {"efficacy": 0.0}),
    ]
    assert "cases" not in json.loads(plain.stdout)
