"""Specs as users write them: YAML's booleans and floats read back as the text written, and a
spec the SDK refuses raises the same typed error, with the same field, as the server's."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import yaml
from security.service_under_test import running_service

from modelsurgery.client import Client, InvalidArgument, InvalidSpec, ModelSurgeryError
from modelsurgery.client.errors import ResourceExhausted, from_rpc_error
from modelsurgery.proto import limits
from modelsurgery.proto.spec import SpecError, load_spec_file, parse_spec, stored_spec_to_proto
from modelsurgery.v1 import jobs_pb2, jobs_pb2_grpc

ITI_YAML = """\
base: tiny
operations:
  - method: iti
    records:
      - question: Is the sky green?
        true: no, it is blue
        false: it is
      - question: Do fish fly?
        true: [mostly not]
        false: [they do]
"""


def test_iti_records_true_and_false_keys_are_the_answers(tmp_path: Path) -> None:
    path = tmp_path / "iti.yaml"
    path.write_text(ITI_YAML)
    record = load_spec_file(path).operations[0].records[0]
    assert (record.true, record.false) == (["no, it is blue"], ["it is"])
    # The same file through plain yaml.safe_load (True/False keys) into the SDK's parser.
    records = parse_spec(yaml.safe_load(ITI_YAML)).operations[0].records
    assert records[1].true == ["mostly not"] and records[1].false == ["they do"]
    with pytest.raises(SpecError) as refused:
        parse_spec(yaml.safe_load(ITI_YAML.replace("false: it is", "false: yes")))
    assert refused.value.field == "operations[0].records[0].false"
    assert "quote it" in str(refused.value)


def test_heads_are_taken_as_written_in_a_spec_file(tmp_path: Path) -> None:
    path = tmp_path / "mask.yaml"
    path.write_text(
        "base: tiny\noperations:\n  - method: mask_heads\n    heads: [7.10, 7.1, 3.0]\n"
    )
    spec = load_spec_file(path)
    assert spec.operations[0].heads == ["7.10", "7.1", "3.0"]
    assert spec.to_dict()["operations"][0]["heads"] == ["7.10", "7.1", "3.0"]


def test_a_head_read_as_an_ambiguous_float_says_quote_it() -> None:
    data = yaml.safe_load("base: tiny\noperations:\n  - method: mask_heads\n    heads: [7.10]\n")
    with Client("127.0.0.1:1") as client, pytest.raises(InvalidSpec) as refused:
        client.submit(data)
    assert refused.value.field == "spec.operations[0].heads"
    assert "quote it" in refused.value.message and "'7.10'" in refused.value.message
    whole = {"base": "tiny", "operations": [{"method": "mask_heads", "heads": [7.0]}]}
    assert parse_spec(whole).operations[0].heads == ["7.0"]  # head 0 whatever was written


def test_an_sdk_refusal_is_the_servers(tmp_path: Path, tiny_llama, tiny_tokenizer) -> None:
    """The client refuses before sending, with the class, message and field the server
    answers the same spec with (sent here raw, past the client's check)."""
    bad = [
        {"method": "mask_heads", "heads": ["0.1", "zero"]},
        {"method": "no_such_method"},
    ]
    with running_service(tmp_path / "home", tiny_llama, tiny_tokenizer) as server:
        raw = jobs_pb2_grpc.JobServiceStub(grpc.insecure_channel(server.address))
        for operation in bad:
            data = {"base": server.version, "operations": [operation]}
            with pytest.raises(grpc.RpcError) as answered:
                raw.SubmitJob(jobs_pb2.SubmitJobRequest(spec=stored_spec_to_proto(data)))
            from_server = from_rpc_error(answered.value)
            with server.client() as client, pytest.raises(ModelSurgeryError) as refused:
                client.submit(data)
            assert isinstance(refused.value, InvalidArgument)
            assert isinstance(refused.value, ValueError)  # as the SDK's SpecError was
            assert type(from_server) is InvalidArgument
            assert (refused.value.field, refused.value.message) == (
                from_server.field,
                from_server.message,
            )


def test_an_oversized_spec_is_resource_exhausted_in_the_sdk() -> None:
    operations = [{"method": "mask_heads", "heads": ["0.1"]}] * (limits.MAX_OPERATIONS + 1)
    with Client("127.0.0.1:1") as client, pytest.raises(InvalidSpec) as refused:
        client.submit({"base": "tiny", "operations": operations})
    assert refused.value.field == "spec.operations"
    prompt = "x " * limits.MAX_SPEC_BYTES
    with Client("127.0.0.1:1") as client, pytest.raises(ResourceExhausted) as too_large:
        client.submit({"base": prompt, "operations": operations[:1]})
    assert too_large.value.field == "spec"
