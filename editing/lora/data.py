"""The three LoRA objectives as token sequences: fact completions (with the prompts the KL term
keeps), prompt/completion examples, and windows of a text file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelsurgery.editing.data import read_text, resolve_text_source, text_windows
from modelsurgery.editing.examples import TokenizedExample, load_examples, tokenize_examples
from modelsurgery.editing.knowledge import tokens as tk
from modelsurgery.editing.lora.config import LoraEditConfig


@dataclass(frozen=True)
class TrainingData:
    """``items``: sequences whose loss starts at ``prompt_length``; ``kl_prompts``: token ids
    whose next-token distributions must stay the base model's (facts only)."""

    items: list[TokenizedExample]
    kl_prompts: list[list[int]] = field(default_factory=list)


def training_data(
    config: LoraEditConfig, tokenizer: Any, data_roots: Sequence[Path]
) -> TrainingData:
    if config.facts is not None:
        return fact_data(config, tokenizer)
    if config.text is not None:
        return TrainingData(text_items(config, tokenizer, data_roots))
    examples = load_examples(config.examples, config.examples_file, data_roots)
    items = tokenize_examples(tokenizer, examples, max_length=config.max_length, append_eos=True)
    return TrainingData(items)


def fact_data(config: LoraEditConfig, tokenizer: Any) -> TrainingData:
    """Each fact's prompt under every context template, followed by ``target_new``."""
    assert config.facts is not None
    items = []
    for fact in config.facts:
        answer = tk.encode_answer(tokenizer, fact.target)
        for template in config.templates():
            prompt = tk.encode(tokenizer, template.format(fact.text))
            items.append(TokenizedExample(input_ids=prompt + answer, prompt_length=len(prompt)))
    if config.kl_prompts is not None:
        kl_texts = list(config.kl_prompts)
    else:
        kl_texts = [prompt for fact in config.facts for prompt in fact.locality_prompts]
    kl = [tk.encode(tokenizer, text)[: config.max_length] for text in kl_texts]
    return TrainingData(items, [ids for ids in kl if ids])


def text_items(
    config: LoraEditConfig, tokenizer: Any, data_roots: Sequence[Path]
) -> list[TokenizedExample]:
    """Seeded random windows of the text; every token is a target."""
    assert config.text is not None
    path = resolve_text_source(config.text, data_roots, "text")
    windows = text_windows(
        tokenizer,
        read_text(path, "text"),
        config.text_samples,
        config.text_window,
        config.seed,
        "text",
    )
    return [TokenizedExample(input_ids=row.tolist(), prompt_length=0) for row in windows]
