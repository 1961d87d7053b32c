"""The ``mask_heads`` job config, and the ``"layer.head"`` names and model sizes every
head-level method validates with."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import Field, field_validator

from modelsurgery.editing.registry import MethodConfig
from modelsurgery.proto import limits

_HEAD_RE = re.compile(r"^\s*(\d+)\s*\.\s*(\d+)\s*$")


def parse_head(spec: str) -> tuple[int, int]:
    """``"3.1"`` -> ``(3, 1)`` (layer, head); ValueError for anything else."""
    match = _HEAD_RE.match(spec)
    if match is None:
        raise ValueError(f"{spec!r} is not of the form 'layer.head' (e.g. '3.1')")
    return int(match.group(1)), int(match.group(2))


def head_as_written(index: int, value: Any) -> Any:
    """A head a YAML or JSON spec gave as a number, as the ``"layer.head"`` text it meant.

    YAML reads ``7.10`` as the float 7.1. A spec file read by ``proto.spec.load_spec_file``
    keeps the text written (``7.10``), which is taken as it is. A bare float (``yaml.safe_load``
    in the SDK, JSON) is taken only when it is unambiguous, a whole number such as 7.0 (head
    0: no trailing zero changes it); 7.1 could be head 1, 10 or 100, so it is refused with the
    advice to quote it."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    written = getattr(value, "text", None)
    if written is not None:
        return written
    if isinstance(value, int) or value.is_integer():
        return f"{int(value)}.0" if isinstance(value, float) else str(value)
    raise ValueError(
        f"heads[{index}]: {value!r} was read as a number, so '{value!r}' cannot be told from "
        f"'{value!r}0' (YAML reads 7.10 as 7.1): quote it, e.g. '{value!r}' or '{value!r}0'"
    )


def format_head(layer: int, head: int) -> str:
    return f"{layer}.{head}"


def config_sizes(model_config: Any) -> tuple[int, int]:
    """(number of layers, number of attention heads) from an HF config (text part if nested)."""
    get_text = getattr(model_config, "get_text_config", None)
    for cfg in (get_text() if get_text else None, model_config):
        if cfg is None:
            continue
        layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
        if isinstance(layers, int) and isinstance(heads, int):
            return layers, heads
    raise ValueError("model config lacks num_hidden_layers / num_attention_heads")


def check_heads_in_range(
    heads: Iterable[tuple[int, int]], model_config: Any, field: str = "heads"
) -> None:
    """Raise ValueError naming ``field[i]`` for the first head outside the model."""
    num_layers, num_heads = config_sizes(model_config)
    for i, (layer, head) in enumerate(heads):
        if layer >= num_layers:
            raise ValueError(
                f"{field}[{i}]: layer {layer} out of range (model has {num_layers} layers)"
            )
        if head >= num_heads:
            raise ValueError(
                f"{field}[{i}]: head {head} out of range (model has {num_heads} heads)"
            )


class MaskHeadsConfig(MethodConfig):
    """Mask attention heads by zeroing their o_proj input columns.

    Fields: ``heads`` ("layer.head" strings, e.g. ``["3.1", "7.4"]``), ``evaluate_perplexity``
    (WikiText-2 perplexity before/after; off by default because it costs two evaluations).
    Metrics: ``heads_masked``; with ``evaluate_perplexity``: ``perplexity_before``,
    ``perplexity_after``, ``perplexity_ratio``.
    """

    method: Literal["mask_heads"] = "mask_heads"
    heads: list[str] = Field(
        min_length=1,
        max_length=limits.MAX_HEADS,
        description='Heads to mask, as "layer.head" strings (e.g. "3.1"); quote them in YAML, '
        "where 7.10 would read as the number 7.1.",
    )
    evaluate_perplexity: bool = Field(
        default=False,
        description="Measure WikiText-2 perplexity before and after (two evaluations, so off by "
        "default).",
    )

    def metric_names(self) -> set[str]:
        return {"heads_masked"}

    @field_validator("heads", mode="before")
    @classmethod
    def _heads_as_written(cls, heads: Any) -> Any:
        if not isinstance(heads, list):
            return heads
        return [head_as_written(i, head) for i, head in enumerate(heads)]

    @field_validator("heads")
    @classmethod
    def _valid_heads(cls, heads: list[str]) -> list[str]:
        seen: dict[tuple[int, int], int] = {}
        for i, spec in enumerate(heads):
            try:
                parsed = parse_head(spec)
            except ValueError as exc:
                raise ValueError(f"heads[{i}]: {exc}") from None
            if parsed in seen:
                raise ValueError(f"heads[{i}]: duplicate of heads[{seen[parsed]}] ({spec!r})")
            seen[parsed] = i
        return heads

    def parsed_heads(self) -> list[tuple[int, int]]:
        return [parse_head(spec) for spec in self.heads]

    def check_against(self, model_config: Any) -> None:
        check_heads_in_range(self.parsed_heads(), model_config)
