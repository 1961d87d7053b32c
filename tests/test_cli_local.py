"""The CLI in local mode (no server): import, versions, alias, generate, with --json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_tokenizer, tiny_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.client.cli import app


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    model_dir = tmp_path / "tiny"
    tiny_model("llama", seed=1).save_pretrained(model_dir)
    build_tiny_tokenizer().save_pretrained(model_dir)
    monkeypatch.setenv("MODELSURGERY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MODELSURGERY_SERVER", raising=False)
    return {"model": model_dir, "store": tmp_path / "home" / "store", "tmp": tmp_path}


def run(*args: str) -> dict | list:
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_import_list_show_alias(env: dict[str, Path]) -> None:
    imported = run("import", str(env["model"]), "--alias", "base")
    assert imported["parent"] is None and imported["methods"] == []
    assert run("alias", "get", "base")["version_id"] == imported["id"]
    listed = run("versions", "list")
    assert [v["id"] for v in listed] == [imported["id"]]
    shown = run("versions", "show", "base")
    assert shown["lineage"] == [imported["id"]] and shown["aliases"] == ["base"]
    assert run("import", str(env["model"]))["id"] == imported["id"]


def test_diff_revert_export_verify(env: dict[str, Path]) -> None:
    base = run("import", str(env["model"]))["id"]
    store = CheckpointStore(env["store"])
    name = "model.layers.0.mlp.down_proj.weight"
    edited = store.tensor(base, name) * 1.5
    child = store.commit(base, {name: edited}, operations=[{"method": "manual"}]).id

    changes = run("versions", "diff", base, child)
    assert [(c["name"], c["status"]) for c in changes] == [(name, "changed")]
    assert changes[0]["relative_norm"] == pytest.approx(0.5, rel=1e-5)

    reverted = run("versions", "revert", child)
    assert reverted["parent"] == child
    assert run("versions", "diff", base, reverted["id"]) == []

    folder = env["tmp"] / "export"
    run("versions", "export", child, str(folder))
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, edited)
    assert run("versions", "verify") == {"ok": True, "problems": []}


def test_alias_compare_and_swap(env: dict[str, Path]) -> None:
    base = run("import", str(env["model"]))["id"]
    run("alias", "set", "prod", base, "--expected", "none")
    result = CliRunner().invoke(app, ["alias", "set", "prod", base, "--expected", "none", "--json"])
    assert result.exit_code != 0
    assert "error" in json.loads(result.stdout)


def test_errors_are_clear(env: dict[str, Path]) -> None:
    result = CliRunner().invoke(app, ["versions", "show", "v-nope", "--json"])
    assert result.exit_code == 2
    assert "v-nope" in json.loads(result.stdout)["error"]
    result = CliRunner().invoke(app, ["import", str(env["tmp"] / "missing"), "--json"])
    assert result.exit_code == 2
    assert "missing" in json.loads(result.stdout)["error"]


def test_generate_locally(env: dict[str, Path]) -> None:
    base = run("import", str(env["model"]))["id"]
    out = run("generate", base, "the capital of", "--max-new-tokens", "3")
    assert out["prompts"] == ["the capital of"] and len(out["completions"]) == 1


def test_artifact_and_heads_plot(env: dict[str, Path]) -> None:
    base = run("import", str(env["model"]))["id"]
    table = {"gradient": [[0.1, -0.2, 0.3, 0.0], [0.5, 0.0, -0.1, 0.2]], "chosen": ["1.0"]}
    store = CheckpointStore(env["store"])
    name = "model.layers.1.self_attn.o_proj.weight"
    masked = store.tensor(base, name).clone()
    masked[:, :16] = 0
    version = store.commit(
        base,
        {name: masked},
        operations=[{"method": "mask_biased_heads"}],
        artifacts={"head_scores.json": json.dumps(table).encode()},
    ).id
    raw = CliRunner().invoke(app, ["versions", "artifact", version, "head_scores.json"])
    assert raw.exit_code == 0 and json.loads(raw.stdout) == table
    png = env["tmp"] / "heads.png"
    assert run("heads", "plot", version, "--out", str(png))["png"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = CliRunner().invoke(app, ["heads", "plot", base, "--json"])
    assert missing.exit_code == 2 and "head_scores.json" in json.loads(missing.stdout)["error"]


def test_ids_are_never_cut_in_an_80_column_table(
    env: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = run("import", str(env["model"]))["id"]
    store = CheckpointStore(env["store"])
    name = "model.layers.0.mlp.down_proj.weight"
    operations = [{"method": "rome"}, {"method": "mask_heads"}, {"method": "prune"}]
    child = store.commit(base, {name: store.tensor(base, name) * 2}, operations=operations).id
    monkeypatch.setenv("COLUMNS", "80")
    result = CliRunner().invoke(app, ["versions", "list"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert base in result.stdout and child in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80


def test_json_states_use_the_cli_spelling() -> None:
    from modelsurgery.client.cli_common import to_data
    from modelsurgery.v1 import jobs_pb2

    job = jobs_pb2.Job(id="job-1", state=jobs_pb2.JOB_STATE_QUEUED)
    assert to_data(job)["state"] == "QUEUED"


def test_watch_json_is_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    from google.protobuf import struct_pb2

    from modelsurgery.client.cli_common import emit_json_line
    from modelsurgery.v1 import jobs_pb2

    fields = struct_pb2.Struct()
    fields.update({"step": 3, "loss": 0.5, "nested": {"a": [1, 2]}})
    for seq in (1, 2):
        emit_json_line(jobs_pb2.JobEvent(seq=seq, message="training", fields=fields))
    lines = capsys.readouterr().out.splitlines()
    events = [json.loads(line) for line in lines]
    assert len(events) == 2 and events[1]["fields"]["nested"] == {"a": [1, 2]}
