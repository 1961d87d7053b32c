"""``org/name[@revision]`` references resolve through the local Hugging Face cache (offline
here), load as folders, and record the commit they resolved to in the imported root."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
from conftest import build_tiny_tokenizer, tiny_model

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.models import load
from modelsurgery.models.errors import ModelReferenceError
from modelsurgery.models.references import SourceKind, resolve_reference

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hub cache holding ``tiny-org/tiny-llama`` at one commit, ``main`` pointing at it."""
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-llama"
    snapshot = repo / "snapshots" / COMMIT
    tiny_model("llama").save_pretrained(snapshot)
    build_tiny_tokenizer().save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_reference_resolves_to_the_cached_snapshot(hub_cache: Path) -> None:
    for reference in ("tiny-org/tiny-llama", "tiny-org/tiny-llama@main"):
        resolved = resolve_reference(reference, allowed_roots=[])
        assert resolved.kind is SourceKind.HUB
        assert resolved.revision == COMMIT
        assert resolved.path == hub_cache / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT


def test_uncached_hub_reference_says_where_it_looked(hub_cache: Path) -> None:
    with pytest.raises(ModelReferenceError, match="not in the local Hugging Face cache"):
        resolve_reference("tiny-org/absent")
    with pytest.raises(ModelReferenceError, match="tiny-org/tiny-llama@v9"):
        resolve_reference("tiny-org/tiny-llama@v9")


def test_an_existing_local_folder_wins_over_the_hub(
    hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = tmp_path / "work" / "tiny-org" / "tiny-llama"
    tiny_model("llama").save_pretrained(local)
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_reference("tiny-org/tiny-llama").kind is SourceKind.FOLDER


def test_imported_hub_model_records_its_revision(hub_cache: Path, tmp_path: Path) -> None:
    loaded = load("tiny-org/tiny-llama@main")
    assert loaded.source_kind is SourceKind.HUB and loaded.revision == COMMIT
    store = CheckpointStore(tmp_path / "store")
    root = store.import_model(
        loaded.model, loaded.tokenizer, reference=loaded.reference, revision=loaded.revision
    )
    assert store.get(root.id).root.revision == COMMIT
    card = (store.export(root.id, tmp_path / "export") / "README.md").read_text()
    assert "base_model: tiny-org/tiny-llama\n" in card
