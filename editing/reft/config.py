"""The ``reft`` job config: which interventions, where, and how to train them."""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from modelsurgery.editing.examples import Example
from modelsurgery.editing.registry import MethodConfig
from modelsurgery.proto import limits

_PART = re.compile(r"^([fl])(\d+)$")
_POSITIONS_HELP = "must look like 'f<n>', 'l<n>' or 'f<n>+l<n>'"


def parse_positions(spec: str) -> tuple[int, int]:
    """``"f3+l2"`` -> (3, 2); ``"l1"`` -> (0, 1); ``"f2"`` -> (2, 0)."""
    parts = [_PART.match(part) for part in spec.split("+")]
    kinds = "".join(m.group(1) for m in parts if m is not None)
    if None in parts or kinds not in ("f", "l", "fl"):
        raise ValueError(f"positions {spec!r} {_POSITIONS_HELP}")
    counts = {m.group(1): int(m.group(2)) for m in parts if m is not None}
    first, last = counts.get("f", 0), counts.get("l", 0)
    if first + last == 0:
        raise ValueError(f"positions {spec!r} selects no token")
    return first, last


class ReftConfig(MethodConfig):
    """Representation finetuning (Wu et al. 2024): low-rank interventions on the residual
    stream (the output of decoder layer i) at the first/last prompt tokens; the base weights
    stay frozen and untouched, so the result is intervention tensors, not changed weights.

    intervention: ``loreft`` Phi(h) = h + R^T(W h + b - R h), rows of R orthonormal;
        ``direft`` Phi(h) = h + W2^T(W1 h + b), no orthogonality (the paper's DiReFT, which
        is pyreft's ``NodireftIntervention``).
    positions: ``f<n>+l<n>`` = first n and last n prompt tokens (``f<n>`` or ``l<n>`` alone
        allowed). With both sides each is capped at prompt_length // 2 (pyreft's rule: the two
        sets never overlap); a one-sided spec is capped at prompt_length.
    share_weights: one intervention per layer for first and last positions (True) or one each.
    dropout: applied to the intervention's edit term during training.
    dtype: dtype of the stored and applied intervention tensors; ``auto`` follows the
        model's (training itself keeps float32 master parameters).
    examples / examples_file: ``{prompt, completion}`` pairs, inline or as JSONL under one of
        the server's data roots (exactly one of them).

    Metrics: ``initial_loss`` and ``final_loss`` (mean completion-token NLL over the training
    examples before/after training, dropout off), ``trainable_parameters``,
    ``lora_parameters_same_rank`` (peft's count for LoRA of the same rank on every attention
    and MLP projection of the same layers: q,k,v,o,gate,up,down for Llama), and
    ``parameter_ratio_vs_lora`` (= trainable / LoRA), ``train_seconds``, ``train_steps``.
    """

    method: Literal["reft"] = "reft"
    data_file_fields: ClassVar[tuple[str, ...]] = ("examples_file",)
    intervention: Literal["loreft", "direft"] = "loreft"
    layers: list[int] = Field(
        min_length=1, description="Decoder layers whose output gets an intervention."
    )
    rank: int = Field(
        default=4, ge=1, le=limits.MAX_RANK, description="Rank of each intervention (rows of R)."
    )
    positions: str = "f1+l1"
    share_weights: bool = False
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    examples: list[Example] | None = Field(default=None, max_length=limits.MAX_EXAMPLES)
    examples_file: str | None = None
    epochs: int = Field(
        default=20, ge=1, le=limits.MAX_EPOCHS, description="Training epochs over the examples."
    )
    lr: float = Field(default=4e-3, gt=0.0, description="Adam learning rate.")
    batch_size: int = Field(
        default=4, ge=1, le=limits.MAX_BATCH_SIZE, description="Examples per training step."
    )
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay.")
    max_length: int = Field(
        default=256,
        ge=2,
        le=limits.MAX_SEQUENCE_TOKENS,
        description="Longest training sequence in tokens.",
    )
    append_eos: bool = Field(
        default=True, description="End each completion with the tokenizer's end-of-sequence token."
    )
    seed: int = Field(default=0, description="Seed of initialisation and shuffling.")

    def metric_names(self) -> set[str]:
        names = {"initial_loss", "final_loss", "trainable_parameters", "train_seconds"}
        return names | {"lora_parameters_same_rank", "parameter_ratio_vs_lora", "train_steps"}

    @field_validator("positions")
    @classmethod
    def _valid_positions(cls, value: str) -> str:
        parse_positions(value)
        return value

    @field_validator("layers")
    @classmethod
    def _unique_layers(cls, value: list[int]) -> list[int]:
        for i, layer in enumerate(value):
            if layer < 0:
                raise ValueError(f"layers[{i}]: layer {layer} is negative")
            if value.index(layer) != i:
                raise ValueError(f"layers[{i}]: layer {layer} is listed twice")
        return value

    @model_validator(mode="after")
    def _one_data_source(self) -> ReftConfig:
        if (self.examples is None) == (self.examples_file is None):
            raise ValueError("examples: give exactly one of 'examples' and 'examples_file'")
        if self.examples is not None and not self.examples:
            raise ValueError("examples: the list is empty")
        return self

    @property
    def first_last(self) -> tuple[int, int]:
        return parse_positions(self.positions)

    def leaves_hooks(self, model_config: Any) -> bool:
        return True

    def check_against(self, model_config: Any) -> None:
        layers = _config_int(model_config, "num_hidden_layers", "n_layer")
        hidden = _config_int(model_config, "hidden_size", "n_embd", "d_model")
        for i, layer in enumerate(self.layers):
            if layers is not None and layer >= layers:
                raise ValueError(
                    f"layers[{i}]: layer {layer} out of range (model has {layers} layers)"
                )
        if hidden is not None and self.rank > hidden:
            raise ValueError(f"rank: {self.rank} exceeds the hidden size {hidden}")


class InterventionSpec(BaseModel):
    """What ``reft/config.json`` records: enough to rebuild the interventions for loading."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = 1
    intervention: Literal["loreft", "direft"]
    layers: list[int]
    rank: int
    positions: str
    share_weights: bool
    hidden_size: int
    dtype: Literal["float32", "bfloat16", "float16"]
    model_type: str

    @property
    def first_last(self) -> tuple[int, int]:
        return parse_positions(self.positions)


def _config_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None
