"""Warm models share weights, not identity (issue 29): two folders with the same weights and
different tokenizers are two versions, and a job on each publishes a child carrying its own
tokenizer; a version whose weights equal a warm one's (a hook version) is still itself."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import build_tiny_tokenizer, tiny_model
from transformers import AutoTokenizer

from modelsurgery.models.digest import files_digest
from modelsurgery.proto.job_state import JobState
from modelsurgery.server.executor import WorkerSettings, execute_job, load_base
from modelsurgery.server.worker import SurgeryWorker

TEMPLATE = "{% for m in messages %}<{{ m.role }}> {{ m.content }} {% endfor %}"


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """The same tiny Llama twice: once with the plain tokenizer, once with a chat template."""
    model = tiny_model("llama", seed=5)
    plain, chat = tmp_path / "plain", tmp_path / "chat"
    for folder in (plain, chat):
        model.save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(plain)
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(chat)
    return plain, chat


@pytest.fixture
def worker(tmp_path: Path) -> SurgeryWorker:
    settings = WorkerSettings(store_root=tmp_path / "store", cache_dir=tmp_path / "cache")
    return SurgeryWorker(settings, num_threads=1)


def test_same_weights_with_another_tokenizer_import_as_another_version(
    worker: SurgeryWorker, folders: tuple[Path, Path]
) -> None:
    plain, chat = folders
    first, second = worker.import_model(str(plain)), worker.import_model(str(chat))
    assert first != second
    assert worker.store.digest(first) == worker.store.digest(second)
    assert worker.import_model(str(plain)) == first and worker.import_model(str(chat)) == second
    warm = [load_base(v, worker.store, worker.cache, worker.settings) for v in (first, second)]
    assert [w.version_id for w in warm] == [first, second]
    assert [w.tokenizer.chat_template for w in warm] == [None, TEMPLATE]
    # One copy of the weights in memory, under one lock.
    assert warm[0].model is warm[1].model and warm[0].lock is warm[1].lock


def test_a_job_on_each_folder_publishes_its_own_tokenizer(
    worker: SurgeryWorker, folders: tuple[Path, Path], tmp_path: Path
) -> None:
    exported = []
    for folder in folders:
        outcome = execute_job(
            {"base": str(folder), "operations": [{"method": "mask_heads", "heads": ["0.1"]}]},
            store=worker.store,
            cache=worker.cache,
            settings=worker.settings,
            emit=lambda event: None,
            is_cancelled=lambda: False,
        )
        assert outcome.state == JobState.SUCCEEDED, outcome.error
        assert outcome.version_id is not None
        parent = worker.store.get(outcome.version_id).parent
        assert parent == worker.import_model(str(folder))
        target = tmp_path / "export" / folder.name
        exported.append(worker.store.export(outcome.version_id, target))
    templates = [AutoTokenizer.from_pretrained(f).chat_template for f in exported]
    assert templates == [None, TEMPLATE]


def test_a_hook_version_loads_as_itself_when_its_parent_is_warm(
    worker: SurgeryWorker, folders: tuple[Path, Path]
) -> None:
    """Same weights, tokenizer and config as its warm parent: the same warm model, but the
    version a job on it builds on (and reads artifacts from) is the one asked for."""
    base = worker.import_model(str(folders[0]))
    steered = worker.store.commit(
        base, {}, operations=[{"method": "note"}], artifacts={"notes.txt": b"x"}
    ).id
    parent = load_base(base, worker.store, worker.cache, worker.settings)
    child = load_base(steered, worker.store, worker.cache, worker.settings)
    assert (parent.version_id, child.version_id) == (base, steered)
    assert child.model is parent.model
    again = load_base(steered, worker.store, worker.cache, worker.settings)
    assert again.version_id == steered and worker.cache.hits >= 1


def test_files_digest_names_content_and_names() -> None:
    one = files_digest({"a.json": b"1", "b.json": b"2"})
    assert one == files_digest({"b.json": b"2", "a.json": b"1"})
    assert one != files_digest({"a.json": b"1", "b.json": b"3"})
    assert one != files_digest({"a.json": b"1", "c.json": b"2"})
