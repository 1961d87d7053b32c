"""A spec is stored as given, without its defaults filled in (issue 29): four MEMIT operations
of 10,000 facts fit the job table and a Job message as they fit the request, and the stored form
parses back to the same spec with the same fingerprint, through JSON and through the proto."""

from __future__ import annotations

import json
from typing import Any

import pytest

from modelsurgery.editing.registry import method_configs
from modelsurgery.proto import limits
from modelsurgery.proto.spec import (
    SpecTooLarge,
    check_stored_size,
    parse_spec,
    spec_from_proto,
    stored_spec_to_proto,
)

FACT = {"prompt": "the capital of {} is", "subject": "france", "target_new": "rome"}
PAIR = {"positive": "good big new", "negative": "bad small old"}
EXAMPLE = {"prompt": "the capital of france is", "completion": " paris"}
# One operation of each method, with some values left at their defaults and some not.
OPERATIONS: dict[str, dict[str, Any]] = {
    "ablate_direction": {"method": "ablate_direction", "pairs": [PAIR] * 4, "layer": 1},
    "concept_bottleneck": {"method": "concept_bottleneck", "dataset": "cebab", "lambda": 2.0},
    "iti": {"method": "iti", "pairs": [PAIR] * 4, "top_k": 2, "layers": [0, 1]},
    "lora": {
        "method": "lora",
        "facts": [{**FACT, "ground_truth": "paris"}],
        "epochs": 1,
        "kl_prompts": ["the city"],
    },
    "mask_biased_heads": {"method": "mask_biased_heads", "bias_types": ["gender"], "top_k": 2},
    "mask_heads": {"method": "mask_heads", "heads": ["0.1", "1.3"]},
    "memit": {"method": "memit", "facts": [FACT], "layers": [1, 2], "evaluate_perplexity": False},
    "ultraedit": {"method": "ultraedit", "facts": [FACT], "layers": [1, 2], "lr": 0.01},
    "prune": {"method": "prune", "kind": "structured", "ratio": 0.25},
    "reft": {"method": "reft", "layers": [0], "examples": [EXAMPLE], "epochs": 3},
    "rome": {"method": "rome", "facts": [FACT], "v_lr": 0.1, "context_templates": ["{}"]},
    "steer": {"method": "steer", "pairs": [PAIR] * 4, "coefficient": 4.0},
}


def test_every_method_has_an_example_here() -> None:
    assert sorted(OPERATIONS) == sorted(method_configs())


@pytest.mark.parametrize("method", sorted(OPERATIONS))
def test_the_stored_form_parses_back_to_the_same_spec(method: str) -> None:
    spec = parse_spec(
        {
            "base": "tiny",
            "operations": [OPERATIONS[method]],
            "alias": "prod",
            "timeout_s": 60,
            "evaluation": {"perplexity_tokens": 1024},
        }
    )
    stored = json.loads(json.dumps(spec.to_dict()))
    assert stored["operations"][0]["method"] == method
    again = parse_spec(stored)
    assert again == spec and again.fingerprint() == spec.fingerprint()
    shown = spec_from_proto(stored_spec_to_proto(stored))
    assert shown == spec and shown.fingerprint() == spec.fingerprint()


def large_memit_spec() -> dict[str, Any]:
    """Four MEMIT operations of 10,000 short facts: just under the request's bound."""
    facts = [{"prompt": "{}", "subject": str(i), "target_new": "X"} for i in range(10_000)]
    return {"base": "tiny", "operations": [{"method": "memit", "facts": facts}] * 4}


def test_a_spec_within_the_bounds_is_stored_within_them() -> None:
    data = large_memit_spec()
    sent = len(json.dumps(data, separators=(",", ":")))
    assert sent <= limits.MAX_SPEC_BYTES
    stored = parse_spec(data).to_dict()
    # Only api_version and gates are added: 2.0 MB sent was 7.0 MB stored with every default.
    assert len(json.dumps(stored, separators=(",", ":"))) <= sent + 100
    check_stored_size(stored)
    assert stored_spec_to_proto(stored).ByteSize() <= limits.LIST_RESPONSE_BYTES


def test_a_stored_form_past_the_bounds_is_refused() -> None:
    stored = parse_spec(large_memit_spec()).to_dict()
    stored["operations"] *= 2
    with pytest.raises(SpecTooLarge, match="as stored"):
        check_stored_size(stored)
