"""The job spec: YAML/dict/proto round trips, field-named errors, gates, fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelsurgery.proto.spec import Gate, SpecError, load_spec_file, parse_spec, spec_from_proto

SPEC = {
    "base": "smollm2-135m",
    "operations": [{"method": "mask_heads", "heads": ["3.1", "7.4"]}],
    "gates": {"perplexity_ratio": "<= 1.05"},
    "alias": "safety-patch",
}


def test_yaml_file_round_trips_through_proto(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(
        "base: smollm2-135m\n"
        "operations:\n"
        "  - method: mask_heads\n"
        '    heads: ["3.1", "7.4"]\n'
        "gates:\n"
        '  perplexity_ratio: "<= 1.05"\n'
        "alias: safety-patch\n"
    )
    spec = load_spec_file(path)
    assert spec == parse_spec(SPEC)
    again = spec_from_proto(spec.to_proto())
    assert again.to_dict() == spec.to_dict()
    assert again.fingerprint() == spec.fingerprint()


def test_fingerprint_changes_with_content() -> None:
    other = {**SPEC, "operations": [{"method": "mask_heads", "heads": ["3.1"]}]}
    assert parse_spec(SPEC).fingerprint() != parse_spec(other).fingerprint()


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({**SPEC, "colour": "red"}, "colour"),
        ({**SPEC, "operations": []}, "operations"),
        ({**SPEC, "operations": [{"heads": ["1.1"]}]}, "operations[0].method"),
        ({**SPEC, "operations": [{"method": "nope"}]}, "operations[0].method"),
        (
            {**SPEC, "operations": [{"method": "mask_heads", "heads": ["1.1"], "x": 1}]},
            "operations[0].x",
        ),
        ({**SPEC, "gates": {"efficacy": "high"}}, "gates.efficacy"),
        ({**SPEC, "base": "  "}, "base"),
        ({**SPEC, "alias": "no spaces allowed"}, "alias"),
        ({**SPEC, "api_version": "v9"}, "api_version"),
        ({**SPEC, "operations": [{"method": "steer"}]}, "operations[0].pairs"),
        (
            {**SPEC, "operations": [{"method": "mask_biased_heads", "top_k": 2, "z_threshold": 1}]},
            "operations[0].z_threshold",
        ),
        ("not a mapping", "spec"),
    ],
)
def test_errors_name_the_field(data: object, field: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    assert err.value.field == field


@pytest.mark.parametrize(
    ("condition", "value", "holds"),
    [
        ("<= 1.05", 1.05, True),
        ("<= 1.05", 1.06, False),
        (">= 0.9", 0.95, True),
        ("> 0", 0.0, False),
        ("< 1e-3", 1e-4, True),
        ("== 2", 2.0, True),
        ("!= 2", 2.0, False),
    ],
)
def test_gates(condition: str, value: float, holds: bool) -> None:
    assert Gate.parse(condition).holds(value) is holds


def test_bad_gate_syntax() -> None:
    for text in ("about 1", "<=", "=< 1", "1 <= x"):
        with pytest.raises(ValueError):
            Gate.parse(text)
