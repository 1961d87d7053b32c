"""Safe roots (issue 17): a server's model paths lie under its roots (by default the home's
``models/``), and a path outside them gets one answer whatever exists there: ``/etc/shadow``,
a private model folder and a path that does not exist read alike, the path as written is
checked before the file system is touched, a symlink out of a root is refused without naming
its target, and no message names the roots or the working folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants as hub_constants
from service_under_test import Running, running_service

from modelsurgery.client import InvalidArgument
from modelsurgery.editing.data import resolve_data_file
from modelsurgery.models import ModelReferenceError, resolve_reference
from modelsurgery.server.app import ServerSettings

SHADOW = "/etc/shadow"


@pytest.fixture
def server(tmp_path: Path, tiny_llama, tiny_tokenizer) -> Iterator[Running]:
    with running_service(tmp_path / "home", tiny_llama, tiny_tokenizer) as running:
        yield running


@pytest.fixture
def private_model(tmp_path: Path, tiny_llama, tiny_tokenizer) -> Path:
    """A complete model folder outside every root."""
    folder = tmp_path / "private" / "model"
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def outside_paths(tmp_path: Path, private_model: Path) -> list[str]:
    return [
        SHADOW,
        str(private_model),
        str(private_model / "config.json"),
        str(tmp_path / "does-not-exist"),
        str(tmp_path / "home" / "models" / ".." / ".." / "private" / "model"),
    ]


def generic(message: str, reference: str) -> str:
    return message.replace(repr(reference), "REF")


def test_paths_outside_the_roots_all_read_alike(tmp_path: Path, private_model: Path) -> None:
    roots = [tmp_path / "home" / "models"]
    messages = set()
    for reference in outside_paths(tmp_path, private_model):
        with pytest.raises(ModelReferenceError) as info:
            resolve_reference(reference, roots)
        messages.add(generic(str(info.value), reference))
    assert messages == {"model reference REF is outside the server's model roots"}


def test_server_answers_outside_paths_alike_and_leaks_no_paths(
    server: Running, tmp_path: Path, private_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with server.client() as client:
        answers = set()
        for reference in outside_paths(tmp_path, private_model):
            spec = {"base": reference, "operations": [{"method": "mask_heads", "heads": ["0.1"]}]}
            with pytest.raises(InvalidArgument) as submitted:
                client.submit(spec)
            with pytest.raises(InvalidArgument) as imported:
                client.import_model(reference)
            for error in (submitted.value, imported.value):
                answers.add(generic(error.message, reference))
        # One answer: no "is a file but not a GGUF file", no root, cwd or resolved path.
        assert answers == {"model reference REF is outside the server's model roots"}
        assert len(server.store.list_versions()) == 1  # nothing was imported


def test_a_model_under_the_default_root_is_accepted(server: Running) -> None:
    with server.client() as client:
        spec = {
            "base": str(server.model),
            "operations": [{"method": "mask_heads", "heads": ["0.1"]}],
        }
        assert client.submit(spec).id


def test_a_symlink_out_of_a_root_is_refused_without_its_target(
    tmp_path: Path, private_model: Path
) -> None:
    root = tmp_path / "home" / "models"
    root.mkdir(parents=True)
    (root / "link").symlink_to(private_model, target_is_directory=True)
    (root / "shadow.gguf").symlink_to(SHADOW)
    for name in ("link", "shadow.gguf"):
        with pytest.raises(ModelReferenceError) as info:
            resolve_reference(str(root / name), [root])
        message = str(info.value)
        assert "outside the server's model roots" in message
        assert str(private_model) not in message and SHADOW not in message
        assert "private" not in message


def test_hub_shaped_paths_outside_the_roots_do_not_reveal_existence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, private_model: Path, offline_hub: None
) -> None:
    """``private/model`` exists relative to the working folder and ``private/absent`` does
    not; outside the roots both are Hub repositories, looked up in the (empty) Hub cache."""
    monkeypatch.chdir(tmp_path)
    roots = [tmp_path / "home" / "models"]
    messages = set()
    for reference in ("private/model", "private/absent"):
        with pytest.raises(ModelReferenceError) as info:
            resolve_reference(reference, roots)
        messages.add(generic(str(info.value), reference))
        assert os.getcwd() not in str(info.value)
    assert len(messages) == 1
    assert "Hugging Face cache" in messages.pop()


def test_roots_default_to_the_home_folders(tmp_path: Path) -> None:
    settings = ServerSettings(store_root=tmp_path / "home" / "store")
    assert settings.model_folders == (tmp_path / "home" / "models",)
    assert settings.data_folders == (tmp_path / "home" / "data",)
    given = ServerSettings(store_root=tmp_path / "store", model_roots=(tmp_path / "m",))
    assert given.model_folders == (tmp_path / "m",)


def test_data_files_outside_the_default_data_root_read_alike(tmp_path: Path) -> None:
    roots = ServerSettings(store_root=tmp_path / "home" / "store").data_folders
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"text": "hunter2"}\n')
    messages = set()
    for path in (str(secret), str(tmp_path / "absent.jsonl"), SHADOW):
        with pytest.raises(ValueError) as info:
            resolve_data_file(path, roots, "examples_file")
        messages.add(str(info.value).replace(repr(path), "REF"))
    assert len(messages) == 1
    inside = roots[0] / "examples.jsonl"
    inside.parent.mkdir(parents=True)
    inside.write_text('{"text": "fine"}\n')
    assert resolve_data_file("examples.jsonl", roots, "examples_file") == inside.resolve()


def test_the_library_without_roots_accepts_any_path(private_model: Path) -> None:
    assert resolve_reference(str(private_model)).path == private_model.resolve()
