"""Field checks several method configs share, so one list of layers or templates is judged the
same way (and with the same message) whichever method reads it."""

from __future__ import annotations


def unique_layers(value: list[int] | None) -> list[int] | None:
    """Layer indices: none negative, none listed twice."""
    for i, layer in enumerate(value or []):
        if layer < 0:
            raise ValueError(f"layers[{i}]: layer {layer} is negative")
        if value is not None and value.index(layer) != i:
            raise ValueError(f"layers[{i}]: layer {layer} is listed twice")
    return value


def one_slot_templates(value: list[str] | None) -> list[str] | None:
    """Context templates: each holds exactly one ``{}`` for the prompt."""
    for i, template in enumerate(value or []):
        if template.count("{}") != 1:
            raise ValueError(f"context_templates[{i}]: needs exactly one '{{}}': {template!r}")
    return value
