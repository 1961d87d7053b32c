"""Links deep inside a model folder (issue 29): a model folder under the roots whose subfolder
holds a link out of them is refused like a top-level one, without naming the target, whether
the subfolder is real or itself a link inside the roots; links that stay inside, and a link
cycle, are accepted."""

from __future__ import annotations

from pathlib import Path

import pytest
from service_under_test import running_service

from modelsurgery.client import InvalidArgument
from modelsurgery.models import ModelReferenceError, resolve_reference


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    """A model folder under the root, and a secret file outside it."""
    root = tmp_path / "models"
    (root / "model" / "tokenizer").mkdir(parents=True)
    (root / "model" / "config.json").write_text("{}")
    secret = tmp_path / "private" / "secret.json"
    secret.parent.mkdir()
    secret.write_text('{"hunter2": 1}')
    return root, secret


def refusal(folder: Path, root: Path) -> str:
    with pytest.raises(ModelReferenceError) as raised:
        resolve_reference(str(folder), [root])
    return str(raised.value)


def test_a_link_out_in_a_subfolder_is_refused(roots: tuple[Path, Path]) -> None:
    root, secret = roots
    (root / "model" / "tokenizer" / "vocab.json").symlink_to(secret)
    message = refusal(root / "model", root)
    assert message.endswith(
        "is outside the server's model roots (its tokenizer/vocab.json links out of them)"
    )
    assert "private" not in message and "secret" not in message


def test_a_link_out_behind_a_linked_folder_inside_the_roots_is_refused(
    roots: tuple[Path, Path],
) -> None:
    root, secret = roots
    shared = root / "shared"
    shared.mkdir()
    (shared / "merges.txt").symlink_to(secret)
    (root / "model" / "extra").symlink_to(shared, target_is_directory=True)
    assert "(its extra/merges.txt links out of them)" in refusal(root / "model", root)


def test_links_inside_the_roots_and_cycles_are_accepted(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    (root / "weights.safetensors").write_bytes(b"")
    (root / "model" / "tokenizer" / "weights.safetensors").symlink_to(root / "weights.safetensors")
    (root / "model" / "tokenizer" / "again").symlink_to(root / "model", target_is_directory=True)
    assert resolve_reference(str(root / "model"), [root]).path == (root / "model").resolve()


def test_submit_and_import_refuse_a_nested_link_out(
    tmp_path: Path, tiny_llama, tiny_tokenizer
) -> None:
    with running_service(tmp_path / "home", tiny_llama, tiny_tokenizer) as server:
        secret = tmp_path / "secret.json"
        secret.write_text("{}")
        (server.model / "sub").mkdir()
        (server.model / "sub" / "tokenizer.json").symlink_to(secret)
        spec = {
            "base": str(server.model),
            "operations": [{"method": "mask_heads", "heads": ["0.1"]}],
        }
        with server.client() as client:
            with pytest.raises(InvalidArgument) as submitted:
                client.submit(spec)
            with pytest.raises(InvalidArgument) as imported:
                client.import_model(str(server.model))
        for error in (submitted.value, imported.value):
            assert "(its sub/tokenizer.json links out of them)" in error.message
