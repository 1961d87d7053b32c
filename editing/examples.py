"""Prompt/completion training examples (ReFT, LoRA): reading them (inline or JSONL under a data
root) and tokenising them into prompt + completion sequences whose loss covers the completion
only. Torch is imported by ``collate`` alone: configs take ``Example`` on the thin client."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelsurgery.editing.data import read_jsonl, resolve_data_file, validation_problem

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100


class Example(BaseModel):
    """One training pair; the loss covers the completion's tokens only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1)
    completion: str = Field(min_length=1)


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    prompt_length: int


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    prompt_lengths: list[int]


def load_examples(
    examples: Sequence[Example] | None, examples_file: str | None, data_roots: Sequence[Path]
) -> list[Example]:
    """The inline examples, or those of a JSONL file under one of ``data_roots``."""
    if examples is not None:
        return list(examples)
    assert examples_file is not None
    if not data_roots:
        raise ValueError("examples_file: this server allows no data files (no data roots)")
    path = resolve_data_file(examples_file, data_roots, "examples_file")
    loaded = []
    for number, record in read_jsonl(path, "examples_file"):
        try:
            loaded.append(Example.model_validate(record))
        except ValidationError as error:
            # The problem without the line's values: a data file may hold secrets.
            raise ValueError(
                f"examples_file: line {number} of {path.name}: {validation_problem(error)}"
            ) from None
    if not loaded:
        raise ValueError(f"examples_file: {examples_file!r} holds no examples")
    return loaded


def tokenize_examples(
    tokenizer: Any, examples: Sequence[Example], *, max_length: int, append_eos: bool
) -> list[TokenizedExample]:
    """Prompt and completion are tokenised apart and joined, so the prompt's tokens (and thus
    the intervened positions) are exactly those the prompt alone gets at generation time."""
    out = []
    for i, example in enumerate(examples):
        prompt = tokenizer(example.prompt).input_ids
        completion = tokenizer(example.completion, add_special_tokens=False).input_ids
        if append_eos and tokenizer.eos_token_id is not None:
            completion = [*completion, tokenizer.eos_token_id]
        if len(prompt) >= max_length:
            raise ValueError(
                f"examples[{i}]: prompt has {len(prompt)} tokens, max_length is {max_length}"
            )
        if not completion:
            raise ValueError(f"examples[{i}]: completion has no tokens")
        ids = (prompt + completion)[:max_length]
        out.append(TokenizedExample(input_ids=ids, prompt_length=len(prompt)))
    return out


def collate(items: Sequence[TokenizedExample], pad_id: int) -> Batch:
    """Right-padded batch; labels are -100 on prompt and padding."""
    import torch

    width = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for b, item in enumerate(items):
        ids = torch.tensor(item.input_ids, dtype=torch.long)
        input_ids[b, : ids.numel()] = ids
        mask[b, : ids.numel()] = 1
        labels[b, item.prompt_length : ids.numel()] = ids[item.prompt_length :]
    return Batch(input_ids, mask, labels, [item.prompt_length for item in items])
