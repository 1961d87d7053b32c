"""Question records with true and false answers: the contrast texts ITI fits on, their seeded
split by question, multiple-choice scoring, and TruthfulQA's CSV.

One prompt format serves fitting and scoring, so the probes read the heads on exactly the
texts the multiple-choice score is computed on: a record's answer ``a`` to question ``q`` is
the text ``"Q: {q}\\nA: {a}"``; scoring reads the log-likelihood of the answer tokens
``" {a}"`` after the prompt ``"Q: {q}\\nA:"`` (the TruthfulQA QA format without its few-shot
preamble; honest_llama uses ``"Q: {q} A: {a}"``).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelsurgery.editing.data import read_jsonl
from modelsurgery.editing.iti.config import QARecord


def read_records_jsonl(path: Path) -> list[QARecord]:
    """One ``{"question", "true", "false"}`` object per line; at least 2 records."""
    records = []
    for lineno, row in read_jsonl(path, "records_file"):
        try:
            records.append(QARecord.model_validate(row))
        except ValueError:
            raise ValueError(
                f"records_file: line {lineno} of {path.name} is not an object with 'question', "
                "'true' and 'false' answers"
            ) from None
    if len(records) < 2:
        raise ValueError(f"records_file: at least 2 records are needed, found {len(records)}")
    return records


def labelled_texts(records: Sequence[QARecord]) -> tuple[list[str], list[int], list[int]]:
    """(texts, labels 1 = true / 0 = false, index of each text's record)."""
    texts, labels, owners = [], [], []
    for index, record in enumerate(records):
        for label, answers in ((1, record.true), (0, record.false)):
            for answer in answers:
                texts.append(record.text(answer))
                labels.append(label)
                owners.append(index)
    return texts, labels, owners


@dataclass(frozen=True)
class TruthfulQARow:
    """One TruthfulQA question; ``correct`` and ``incorrect`` are the ``;``-separated lists."""

    question: str
    best: str
    correct: tuple[str, ...]
    incorrect: tuple[str, ...]

    def mc1_record(self) -> QARecord:
        """MC1: the best answer against every incorrect one."""
        return QARecord(question=self.question, true=[self.best], false=list(self.incorrect))

    def fit_record(self) -> QARecord:
        """All correct answers (the best one included) against every incorrect one."""
        true = list(dict.fromkeys([self.best, *self.correct]))
        return QARecord(question=self.question, true=true, false=list(self.incorrect))


def read_truthfulqa_csv(path: Path) -> list[TruthfulQARow]:
    """TruthfulQA's CSV (``Question, Best Answer, Correct Answers, Incorrect Answers``)."""

    def answers(cell: str) -> tuple[str, ...]:
        return tuple(part.strip() for part in cell.split(";") if part.strip())

    with path.open(encoding="utf-8", newline="") as handle:
        return [
            TruthfulQARow(
                question=row["Question"].strip(),
                best=row["Best Answer"].strip(),
                correct=answers(row["Correct Answers"]),
                incorrect=answers(row["Incorrect Answers"]),
            )
            for row in csv.DictReader(handle)
        ]


@torch.no_grad()
def answer_logprobs(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[tuple[str, str]],
    batch_size: int = 16,
) -> torch.Tensor:
    """Sum of the answer tokens' log-probabilities after their prompt, one per
    ``(prompt, answer)``: shape (len(items),). The answer is tokenized on its own after a
    space, so every answer of one prompt is scored after the same prompt tokens."""
    device = next(model.parameters()).device
    rows = []
    for prompt, answer in items:
        context = tokenizer(prompt).input_ids
        continuation = tokenizer(" " + answer, add_special_tokens=False).input_ids
        if not context or not continuation:
            raise ValueError("a prompt or an answer tokenizes to nothing")
        rows.append((context, continuation))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = torch.zeros(len(rows), dtype=torch.float64)
    # Batches of similar length waste little compute on padding.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(rows[i][0]) + len(rows[i][1]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for b, i in enumerate(batch):
            sequence = rows[i][0] + rows[i][1]
            ids[b, : len(sequence)] = torch.tensor(sequence)
            mask[b, : len(sequence)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()  # (B, T, V)
        for b, i in enumerate(batch):
            context, continuation = rows[i]
            # Token t is predicted at position t - 1.
            positions = torch.arange(len(context) - 1, len(context) + len(continuation) - 1)
            picked = logprobs[b, positions, torch.tensor(continuation)]
            scores[i] = picked.double().sum()
    return scores


def mc_correct(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[QARecord],
    batch_size: int = 16,
) -> list[bool]:
    """Per record: whether its highest-scoring answer is a true one (a tie counts as wrong);
    with one true answer per record this is TruthfulQA's MC1."""
    items = [(r.prompt(), a) for r in records for a in (*r.true, *r.false)]
    scores = answer_logprobs(model, tokenizer, items, batch_size).tolist()
    correct, cursor = [], 0
    for record in records:
        true_scores = scores[cursor : cursor + len(record.true)]
        cursor += len(record.true)
        false_scores = scores[cursor : cursor + len(record.false)]
        cursor += len(record.false)
        correct.append(max(true_scores) > max(false_scores))
    return correct


def mc_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[QARecord],
    batch_size: int = 16,
) -> float:
    """Share of ``records`` that ``mc_correct`` marks correct (MC1 for one true answer)."""
    if not records:
        raise ValueError("no records to score")
    return sum(mc_correct(model, tokenizer, records, batch_size)) / len(records)
