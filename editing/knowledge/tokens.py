"""Token sequences for edits and evaluation: where the subject ends, where the answer is read.

Prompt and answer are tokenized separately and concatenated, so answer tokens sit at known
positions whatever the tokenizer merges; the subject's last token is found from character
offsets (fast tokenizers) or, failing those, by tokenizing the text up to the subject's end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Sequence:
    """One token sequence: ``ids``; ``lookup`` = the subject's last token (or -1);
    ``answer`` = answer token ids, predicted at positions ``answer_start - 1 + j``."""

    ids: list[int]
    lookup: int = -1
    answer: list[int] = field(default_factory=list)
    answer_start: int = 0

    @property
    def answer_positions(self) -> list[int]:
        return [self.answer_start - 1 + j for j in range(len(self.answer))]


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt, with whatever special tokens the tokenizer adds in front."""
    return list(tokenizer(text).input_ids)


def encode_answer(tokenizer: Any, answer: str) -> list[int]:
    ids = list(tokenizer(answer, add_special_tokens=False).input_ids)
    if not ids:
        raise ValueError(f"answer {answer!r} tokenizes to nothing")
    return ids


def subject_last_token(tokenizer: Any, text: str, subject: str, search_from: int = 0) -> int:
    """Index of the last token of the first occurrence of ``subject`` in ``text`` at or after
    character ``search_from`` (past a context prefix that might contain the same word)."""
    start = text.find(subject, search_from)
    if start < 0:
        raise ValueError(f"subject {subject!r} not found in {text!r}")
    end = start + len(subject)
    try:
        offsets = tokenizer(text, return_offsets_mapping=True).offset_mapping
    except (NotImplementedError, TypeError, ValueError):
        offsets = None
    if offsets:
        hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < end]
        if hits:
            return hits[-1]
    return len(encode(tokenizer, text[:end].rstrip())) - 1


def prompt_with_answer(
    tokenizer: Any,
    text: str,
    answer: str,
    subject: str | None = None,
    *,
    drop_last: bool = False,
    search_from: int = 0,
) -> Sequence:
    """``text`` followed by ``answer``'s tokens (all but the last when ``drop_last``: the v*
    loss predicts every answer token, so the last one is never an input)."""
    prompt_ids = encode(tokenizer, text)
    answer_ids = encode_answer(tokenizer, answer)
    ids = prompt_ids + (answer_ids[:-1] if drop_last else answer_ids)
    lookup = -1 if subject is None else subject_last_token(tokenizer, text, subject, search_from)
    return Sequence(ids=ids, lookup=lookup, answer=answer_ids, answer_start=len(prompt_ids))


def subject_prompt(tokenizer: Any, text: str, subject: str, search_from: int = 0) -> Sequence:
    lookup = subject_last_token(tokenizer, text, subject, search_from)
    return Sequence(ids=encode(tokenizer, text), lookup=lookup)


def pad_batch(seqs: list[Sequence], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask (positions stay 0..n-1 for every row)."""
    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq.ids)] = torch.tensor(seq.ids, dtype=torch.long)
        mask[row, : len(seq.ids)] = 1
    return ids, mask


def pad_id_of(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0
