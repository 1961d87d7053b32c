"""Roles and ownership (issue 17): against the real JobService and CheckpointService behind the
real token interceptor on a loopback port, bob cannot see, watch or cancel alice's job nor move
her alias, a reader cannot submit, an admin can do all of it; token lines are parsed strictly."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from service_under_test import Running, running_service
from typer.testing import CliRunner

from modelsurgery.client import Client, PermissionDenied
from modelsurgery.client.cli import app
from modelsurgery.server.auth import (
    TOKENS_ENV,
    Caller,
    Role,
    TokenFileError,
    load_tokens,
    parse_tokens,
    take_env_tokens,
)
from modelsurgery.v1 import jobs_pb2

TOKENS = {
    "alice": "alice-token-0123456789",
    "bob": "bob-token-0123456789",
    "rita": "rita-token-0123456789",
    "root": "root-token-0123456789",
}
TOKEN_LINES = [
    f"alice:{TOKENS['alice']}",
    f"bob:writer:{TOKENS['bob']}",
    f"rita:reader:{TOKENS['rita']}",
    f"root:admin:{TOKENS['root']}",
]


# --- token lines ------------------------------------------------------------------------------
def test_token_lines_carry_a_caller_and_a_role() -> None:
    tokens = parse_tokens([*TOKEN_LINES, "# a comment", "", "bare-token-0123456789"])
    assert tokens[TOKENS["alice"]] == Caller("alice", Role.WRITER)
    assert tokens[TOKENS["bob"]] == Caller("bob", Role.WRITER)
    assert tokens[TOKENS["rita"]] == Caller("rita", Role.READER)
    assert tokens[TOKENS["root"]] == Caller("root", Role.ADMIN)
    assert tokens["bare-token-0123456789"] == Caller("caller-7", Role.WRITER)


def test_a_token_may_contain_colons_after_its_name() -> None:
    assert parse_tokens(["carl:abc:defghijklmnopq"]) == {
        "abc:defghijklmnopq": Caller("carl", Role.WRITER)
    }


def test_a_bare_token_with_a_colon_is_refused_naming_the_line() -> None:
    with pytest.raises(TokenFileError) as info:
        parse_tokens(["# tokens", "s3cr3tpart:x"])
    message = str(info.value)
    assert "line 2" in message and "name:token" in message
    assert "s3cr3tpart" not in message  # the secret is not echoed


@pytest.mark.parametrize("line", ["alice:short", "alice:admin:short", "tiny", "alice:reader:"])
def test_short_tokens_are_refused(line: str) -> None:
    with pytest.raises(TokenFileError, match="line 1"):
        parse_tokens([line])


def test_environment_tokens_are_removed_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(TOKENS_ENV, f"dora:{'d' * 20}")
    (tmp_path / "tokens").write_text(TOKEN_LINES[0] + "\n")
    env_tokens = take_env_tokens()
    assert TOKENS_ENV not in os.environ
    tokens = load_tokens(tmp_path / "tokens", env_tokens)
    assert {c.name for c in tokens.values()} == {"alice", "dora"}


# --- a real server ------------------------------------------------------------------------
@pytest.fixture
def server(tmp_path: Path, tiny_llama, tiny_tokenizer) -> Iterator[Running]:
    tokens = parse_tokens(TOKEN_LINES)
    with running_service(tmp_path, tiny_llama, tiny_tokenizer, tokens, ("team-*",)) as running:
        yield running


def client(server: Running, who: str) -> Client:
    return server.client(TOKENS[who])


def spec(version: str, alias: str | None = None) -> dict[str, Any]:
    return {
        "base": version,
        "operations": [{"method": "mask_heads", "heads": ["0.1"]}],
        **({"alias": alias} if alias else {}),
    }


def denied(call: Any, *args: Any, **kwargs: Any) -> PermissionDenied:
    with pytest.raises(PermissionDenied) as info:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    return info.value


def test_a_caller_sees_and_cancels_only_its_own_jobs(server: Running) -> None:
    with client(server, "alice") as alice, client(server, "bob") as bob:
        job = alice.submit(spec(server.version))
        assert [j.id for j in alice.list_jobs()] == [job.id]
        assert list(bob.list_jobs()) == []
        for call in (bob.get_job, bob.cancel, bob.watch):
            error = denied(call, job.id)
            assert "belongs to another caller" in error.message and error.field == "job_id"
        assert alice.get_job(job.id).state == jobs_pb2.JOB_STATE_QUEUED


def test_an_admin_sees_and_cancels_every_callers_jobs(server: Running) -> None:
    with client(server, "alice") as alice, client(server, "root") as root:
        job = alice.submit(spec(server.version))
        assert [j.id for j in root.list_jobs()] == [job.id]
        assert root.get_job(job.id).id == job.id
        assert root.cancel(job.id).state == jobs_pb2.JOB_STATE_CANCELLED


def test_a_reader_reads_but_cannot_submit_or_cancel(server: Running) -> None:
    with client(server, "alice") as alice, client(server, "rita") as rita:
        job = alice.submit(spec(server.version))
        error = denied(rita.submit, spec(server.version))
        assert "needs the writer role" in error.message and "reader" in error.message
        denied(rita.set_alias, "rita-alias", server.version)
        denied(rita.cancel, job.id)
        assert [v.id for v in rita.list_versions()] == [server.version]
        assert list(rita.list_jobs()) == []


def test_only_the_owner_or_an_admin_moves_an_alias(server: Running) -> None:
    with (
        client(server, "alice") as alice,
        client(server, "bob") as bob,
        client(server, "root") as root,
    ):
        alice.set_alias("alice-prod", server.version, expected=None)
        assert server.store.alias_owner("alice-prod") == "alice"
        error = denied(bob.set_alias, "alice-prod", server.version)
        assert "belongs to another caller" in error.message and error.field == "name"
        error = denied(bob.submit, spec(server.version, alias="alice-prod"))
        assert error.field == "spec.alias"
        error = denied(bob.import_model, str(server.model), alias="alice-prod")
        assert error.field == "alias"
        alice.set_alias("alice-prod", server.version)
        root.set_alias("alice-prod", server.version)
        assert server.store.alias_owner("alice-prod") == "alice"  # an admin move keeps it
        bob.submit(spec(server.version, alias="bob-prod"))  # a new alias is anyone's to claim


def test_shared_aliases_are_moved_by_any_writer(server: Running) -> None:
    with client(server, "alice") as alice, client(server, "bob") as bob:
        alice.set_alias("team-staging", server.version)
        bob.set_alias("team-staging", server.version)
        bob.submit(spec(server.version, alias="team-staging"))


def test_an_alias_without_a_recorded_owner_is_for_admins(server: Running) -> None:
    server.store.set_alias("legacy", server.version)  # as an older store or the local CLI did
    assert server.store.alias_owner("legacy") == ""
    with client(server, "bob") as bob, client(server, "root") as root:
        error = denied(bob.set_alias, "legacy", server.version)
        assert "no recorded owner" in error.message
        root.set_alias("legacy", server.version)


def test_wrong_tokens_stay_unauthenticated(server: Running) -> None:
    with Client(server.address, token="x" * 20, timeout=30) as stranger:
        with pytest.raises(Exception) as info:
            list(stranger.list_jobs())
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]


def test_serve_refuses_to_start_on_a_bad_token_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKENS_ENV, "s3cr3tpart:x")
    result = CliRunner().invoke(app, ["serve", "--store", str(tmp_path / "store"), "--port", "0"])
    assert result.exit_code == 2
    assert "token line 1" in result.output and "name:token" in result.output
    assert "s3cr3tpart" not in result.output
    assert not (tmp_path / "jobs.sqlite3").exists()
