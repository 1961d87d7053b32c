"""Data files a spec names are checked at admission (issue 31): one missing under the data
roots is INVALID_ARGUMENT naming ``operations[i].<field>`` before anything is queued, instead
of a job that fails after the queue as ``ValueError``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from service_under_test import Running, running_service

from modelsurgery.client import InvalidArgument
from modelsurgery.editing.data import CROWS_PAIRS_PATH, DATA_ENV
from modelsurgery.editing.registry import method_configs
from modelsurgery.server.admission import check_data_files

GOOD = '{"prompt": "a", "completion": "b"}\n'


@pytest.fixture
def server(tmp_path: Path, tiny_llama, tiny_tokenizer) -> Iterator[Running]:
    with running_service(tmp_path / "home", tiny_llama, tiny_tokenizer) as running:
        (tmp_path / "home" / "data").mkdir()
        (tmp_path / "home" / "data" / "train.jsonl").write_text(GOOD)
        yield running


MISSING = [
    ({"method": "reft", "layers": [0], "examples_file": "missing.jsonl"}, "examples_file"),
    ({"method": "lora", "examples_file": "missing.jsonl"}, "examples_file"),
    ({"method": "lora", "text": "missing.txt"}, "text"),
    ({"method": "steer", "layers": [0], "pairs_file": "missing.jsonl"}, "pairs_file"),
    ({"method": "iti", "top_k": 1, "records_file": "missing.jsonl"}, "records_file"),
    ({"method": "mask_biased_heads", "pairs_file": "missing.jsonl"}, "pairs_file"),
    ({"method": "prune", "calibration_data": "missing.txt"}, "calibration_data"),
]


@pytest.mark.parametrize(("operation", "field"), MISSING)
def test_a_missing_data_file_is_refused_at_submit_naming_its_field(
    server: Running, operation: dict, field: str
) -> None:
    spec = {"base": server.version, "operations": [{"method": "mask_heads", "heads": ["0.1"]}]}
    spec["operations"].append(operation)
    with server.client() as client:
        with pytest.raises(InvalidArgument) as refused:
            client.submit(spec)
        assert not list(client.list_jobs())
    assert refused.value.field == f"spec.operations[1].{field}"
    assert "missing." in refused.value.message and "data roots" in refused.value.message


def test_a_data_file_under_the_roots_is_admitted(server: Running) -> None:
    operation = {"method": "reft", "layers": [0], "examples_file": "train.jsonl"}
    with server.client() as client:
        assert client.submit({"base": server.version, "operations": [operation]}).id


def test_every_declared_data_field_is_a_config_field() -> None:
    """The declarations admission walks name real fields (a typo would skip a check)."""
    for name, config in method_configs().items():
        for field in (*config.data_file_fields, *config.text_source_fields):
            assert field in config.model_fields, f"{name}.{field}"


def test_check_data_files_reads_the_declarations(tmp_path: Path) -> None:
    config = method_configs()["reft"].model_validate(
        {"method": "reft", "layers": [0], "examples_file": "train.jsonl"}
    )
    with pytest.raises(ValueError, match=r"^examples_file: 'train.jsonl' is not a file"):
        check_data_files(config, (tmp_path,))
    (tmp_path / "train.jsonl").write_text(GOOD)
    check_data_files(config, (tmp_path,))


@pytest.mark.parametrize(
    ("operation", "field", "missing"),
    [
        ({"method": "ablate_direction", "dataset": "winogender"}, "dataset", "winogender"),
        ({"method": "mask_biased_heads"}, "pairs", "crows-pairs/crows_pairs_anonymized.csv"),
    ],
)
def test_a_shipped_data_set_the_server_lacks_is_refused_at_submit(
    server: Running,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    operation: dict,
    field: str,
    missing: str,
) -> None:
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "no-shared-data"))
    spec = {"base": server.version, "operations": [operation]}
    with server.client() as client, pytest.raises(InvalidArgument) as refused:
        client.submit(spec)
    assert refused.value.field == f"spec.operations[0].{field}"
    assert "lacks the shared data" in refused.value.message and missing in refused.value.message
    assert str(tmp_path) not in refused.value.message


def test_shared_data_sets_named_are_declared() -> None:
    configs = method_configs()
    ablate = configs["ablate_direction"].model_validate({"dataset": "crows-pairs-gender"})
    assert ablate.shared_data() == {"dataset": (CROWS_PAIRS_PATH,)}
    pairs = [{"stereo": "he a", "anti": "she a"}, {"stereo": "he b", "anti": "she b"}]
    assert configs["mask_biased_heads"].model_validate({"pairs": pairs}).shared_data() == {}
