"""Aliases are listed and deleted through the API (issue 31): the owner or an admin deletes
one, another writer or a reader cannot; and a built-in model reference (``smollm2-135m``) names
its imported root everywhere a version id does, as it does as a job's base."""

from __future__ import annotations

from pathlib import Path

import pytest
from service_under_test import running_service

from modelsurgery.client import FailedPrecondition, NotFound, PermissionDenied
from modelsurgery.models.aliases import BUILTIN_ALIASES
from modelsurgery.models.errors import ModelPackageMissingError
from modelsurgery.server.auth import parse_tokens

ALICE, BOB, READER, ADMIN = (f"{n}-token-0123456789" for n in ("alice", "bob", "reader", "admin"))
TOKENS = [f"alice:{ALICE}", f"bob:writer:{BOB}", f"rita:reader:{READER}", f"ada:admin:{ADMIN}"]


def test_alias_list_and_delete_owner_or_admin(tmp_path: Path, tiny_llama, tiny_tokenizer) -> None:
    tokens = parse_tokens(TOKENS)
    with (
        running_service(tmp_path, tiny_llama, tiny_tokenizer, tokens) as server,
        server.client(ALICE) as alice,
        server.client(BOB) as bob,
        server.client(READER) as reader,
        server.client(ADMIN) as admin,
    ):
        alice.set_alias("alice-prod", server.version, expected=None)
        bob.set_alias("bob-prod", server.version, expected=None)
        listed = [(a.name, a.version_id, a.owner) for a in reader.list_aliases()]
        assert listed == [
            ("alice-prod", server.version, "alice"),
            ("bob-prod", server.version, "bob"),
        ]
        with pytest.raises(PermissionDenied, match="only its owner or an admin") as refused:
            bob.delete_alias("alice-prod")
        assert refused.value.field == "name"
        with pytest.raises(PermissionDenied):
            reader.delete_alias("alice-prod")
        assert alice.delete_alias("alice-prod") == server.version
        with pytest.raises(NotFound):
            alice.delete_alias("alice-prod")
        assert admin.delete_alias("bob-prod", expected=server.version) == server.version
        assert alice.list_aliases() == []
        assert server.store.get(server.version).id == server.version  # the version stays


def gemma_installed() -> bool:
    try:
        BUILTIN_ALIASES["gemma3-270m"].check_installed()
    except ModelPackageMissingError:
        return False
    return True


def test_a_builtin_reference_names_its_imported_root(
    tmp_path: Path, tiny_llama, tiny_tokenizer
) -> None:
    """The store holds a root imported from ``smollm2-135m`` (as a job on that base leaves
    it); every version-taking call resolves the reference to it."""
    with running_service(tmp_path, tiny_llama, tiny_tokenizer) as server:
        root = server.store.import_model(tiny_llama, tiny_tokenizer, reference="smollm2-135m")
        with server.client() as client:
            assert client.get_version("smollm2-135m").version.id == root.id
            assert client.diff("smollm2-135m", server.version) == []
            assert client.set_alias("prod", "smollm2-135m") == root.id
            # A built-in never imported: its packages missing -> FAILED_PRECONDITION with the
            # install hint; installed -> NOT_FOUND (this test server has no worker to import it).
            with pytest.raises(NotFound if gemma_installed() else FailedPrecondition):
                client.get_version("gemma3-270m")
            with pytest.raises(NotFound):
                client.get_version("no-such-model")
