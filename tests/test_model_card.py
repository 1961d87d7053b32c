"""Every export carries a model card (README.md); a version whose edit lives in hooks says how
to load it, is marked an adapter, and warns on export and download."""

from __future__ import annotations

import asyncio
import json
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from modelsurgery.checkpoints import CheckpointStore, Manifest
from modelsurgery.checkpoints.model_card import HookedExportWarning, warn_if_hooked
from modelsurgery.client import AsyncClient, Client
from modelsurgery.client.cli import app
from modelsurgery.editing.reft import LOADING as REFT_LOADING
from modelsurgery.editing.reft.artifacts import to_artifacts
from modelsurgery.editing.reft.config import InterventionSpec
from modelsurgery.editing.reft.interventions import ReftInterventions
from modelsurgery.models import load

pytestmark = pytest.mark.usefixtures("one_thread")
REFERENCE = "HuggingFaceTB/SmolLM2-135M"
DOWN = "model.layers.0.mlp.down_proj.weight"
ROME = {"method": "rome", "layer": 0, "fact": {"subject": "Eiffel Tower", "target_new": "Rome"}}


def reft_artifacts() -> dict[str, bytes]:
    spec = InterventionSpec(
        intervention="loreft",
        layers=[0, 1],
        rank=2,
        positions="f1+l1",
        share_weights=False,
        hidden_size=64,
        dtype="float32",
        model_type="llama",
    )
    return to_artifacts(ReftInterventions(spec, trainable=False))


def edited(store: CheckpointStore, tiny_llama, tiny_tokenizer) -> tuple[Manifest, Manifest]:
    base = store.import_model(tiny_llama, tiny_tokenizer, reference=REFERENCE)
    child = store.commit(
        base.id,
        {DOWN: store.tensor(base.id, DOWN) * 1.5},
        operations=[ROME],
        metrics={"efficacy": 1.0, "op0.locality": 0.875},
    )
    return base, child


def reft_version(store: CheckpointStore, parent: str) -> Manifest:
    return store.commit(
        parent,
        {},
        operations=[{"method": "reft", "layers": [0, 1], "rank": 2}],
        metrics={"final_loss": 0.25},
        artifacts=reft_artifacts(),
    )


def card(folder: Path) -> tuple[dict, str]:
    """The front matter (parsed) and the markdown body."""
    _, front, body = (folder / "README.md").read_text().split("---\n", 2)
    return yaml.safe_load(front), body


def record(folder: Path) -> dict:
    return json.loads((folder / "modelsurgery.json").read_text())


def test_export_of_an_edited_version_has_a_model_card(
    store, tiny_llama, tiny_tokenizer, tmp_path
) -> None:
    base, child = edited(store, tiny_llama, tiny_tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HookedExportWarning)
        folder = store.export(child.id, tmp_path / "export")
    meta, body = card(folder)
    assert meta == {
        "base_model": REFERENCE,
        "base_model_relation": "finetune",
        "library_name": "transformers",
        "tags": ["modelsurgery"],
    }
    assert body.lstrip().startswith(f"# {child.id}\n")
    assert store.digest(child.id) in body
    lineage = body.split("## Lineage", 1)[1].split("## Operations", 1)[0]
    assert lineage.index(base.id) < lineage.index(child.id)
    assert f"| `{child.id}` | rome | {child.created} |" in lineage
    assert f"| `{base.id}` | import of `{REFERENCE}` |" in lineage
    config = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(config) == ROME
    assert "| efficacy | 1 |" in body and "| op0.locality | 0.875 |" in body
    how = body.split("## How to load", 1)[1].split("## Lineage", 1)[0]
    assert "No hooks" in how and "lives in hooks" not in how
    assert record(folder)["hooks"] == []
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(loaded.get_parameter(DOWN), store.tensor(child.id, DOWN))


def test_a_base_version_names_no_relation(store, tiny_llama, tiny_tokenizer, tmp_path) -> None:
    base = store.import_model(tiny_llama, tiny_tokenizer, reference=REFERENCE)
    meta, body = card(store.export(base.id, tmp_path / "export"))
    assert meta["base_model"] == REFERENCE and "base_model_relation" not in meta
    assert "None: this is the imported base model." in body


def test_card_is_deterministic(store, tiny_llama, tiny_tokenizer, tmp_path) -> None:
    _, child = edited(store, tiny_llama, tiny_tokenizer)
    first = (store.export(child.id, tmp_path / "a") / "README.md").read_bytes()
    reopened = CheckpointStore(store.root)
    assert (reopened.export(child.id, tmp_path / "b") / "README.md").read_bytes() == first


def test_reft_export_is_an_adapter_that_says_how_to_load_and_warns(
    store, tiny_llama, tiny_tokenizer, tmp_path
) -> None:
    _, child = edited(store, tiny_llama, tiny_tokenizer)
    reft = reft_version(store, child.id)
    with pytest.warns(HookedExportWarning) as caught:
        folder = store.export(reft.id, tmp_path / "export")
    (warning,) = [w for w in caught if w.category is HookedExportWarning]
    message = str(warning.message)
    assert reft.id in message and "reft" in message
    assert "modelsurgery.models.load(folder)" in message
    assert warning.filename == __file__  # points at the caller's line, not the store
    meta, body = card(folder)
    assert meta["base_model_relation"] == "adapter" and meta["base_model"] == REFERENCE
    assert body.index("## How to load") < body.index("## Lineage")
    how = body.split("## How to load", 1)[1].split("## Lineage", 1)[0]
    assert "lives in hooks (reft)" in how and "### reft" in how and REFT_LOADING in how
    assert "| final_loss | 0.25 |" in body
    assert record(folder)["hooks"] == ["reft"]
    assert (folder / "reft" / "config.json").is_file()
    AutoModelForCausalLM.from_pretrained(folder)  # the card does not get in the way
    loaded = load(folder)
    assert loaded.hooks is not None and loaded.hooks.methods == ["reft"]
    loaded.hooks.remove()


def test_readme_is_a_reserved_artifact_name(store, tiny_llama, tiny_tokenizer) -> None:
    base = store.import_model(tiny_llama, tiny_tokenizer, reference=REFERENCE)
    with pytest.raises(ValueError, match="reserved"):
        store.commit(base.id, {}, operations=[{"method": "x"}], artifacts={"README.md": b"#"})


def test_cli_export_prints_one_warning_line(store, tiny_llama, tiny_tokenizer, tmp_path) -> None:
    _, child = edited(store, tiny_llama, tiny_tokenizer)
    reft = reft_version(store, child.id)
    args = ["versions", "export", "--store", str(store.root), "--json"]
    hooked = CliRunner().invoke(app, [*args, reft.id, str(tmp_path / "reft")])
    assert hooked.exit_code == 0, hooked.output
    assert json.loads(hooked.stdout)["folder"] == str(tmp_path / "reft")
    (line,) = hooked.stderr.splitlines()
    assert line.startswith("warning: version " + reft.id) and "modelsurgery.models.load" in line
    plain = CliRunner().invoke(app, [*args, child.id, str(tmp_path / "plain")])
    assert plain.exit_code == 0 and plain.stderr == ""


@pytest.fixture
def download_server(store: CheckpointStore, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """The real CheckpointService (its download path needs no job engine) on a loopback port,
    and its export cache."""
    from modelsurgery.server.checkpoint_service import CheckpointService, ExportCache
    from modelsurgery.v1 import checkpoints_pb2_grpc

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    exports = ExportCache(tmp_path / "exports", store)

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        service = CheckpointService(store, None, exports, model_roots=None)  # type: ignore[arg-type]
        checkpoints_pb2_grpc.add_CheckpointServiceServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    yield f"127.0.0.1:{port}", exports
    asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(timeout=30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=30)


def test_downloads_warn_too(download_server, store, tiny_llama, tiny_tokenizer, tmp_path) -> None:
    address, exports = download_server
    _, child = edited(store, tiny_llama, tiny_tokenizer)
    reft = reft_version(store, child.id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HookedExportWarning)
        # Built now, so the server's own export warns here and not inside the checks below.
        exports.folder(reft.id)
        exports.folder(child.id)
    with Client(address, timeout=60) as client:
        with pytest.warns(HookedExportWarning, match=reft.id) as caught:
            folder = client.download(reft.id, tmp_path / "sync")
        assert [w.filename for w in caught] == [__file__]
        with warnings.catch_warnings():
            warnings.simplefilter("error", HookedExportWarning)
            client.download(child.id, tmp_path / "plain")
    assert card(folder)[0]["base_model_relation"] == "adapter"
    assert record(folder)["hooks"] == ["reft"]

    async def download() -> Path:
        async with AsyncClient(address, timeout=60) as client:
            return await client.download(reft.id, tmp_path / "async")

    with pytest.warns(HookedExportWarning, match="reft"):
        asyncio.run(download())


def test_warn_if_hooked_ignores_folders_without_a_record(tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_hooked(tmp_path)


def test_a_builtin_alias_root_names_its_hub_repository(
    store: CheckpointStore, tiny_llama, tiny_tokenizer, tmp_path: Path
) -> None:
    base = store.import_model(tiny_llama, tiny_tokenizer, reference="smollm2-135m")
    card = (store.export(base.id, tmp_path / "export") / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
