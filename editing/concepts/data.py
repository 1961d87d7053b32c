"""Concept-labelled texts: CEBaB's shipped splits or a user's JSONL file, as index-coded
examples (torch-free)."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from modelsurgery.editing.concepts.config import (
    CEBAB_DEV,
    CEBAB_TRAIN,
    CONCEPT_VALUES,
    ConceptBottleneckConfig,
)
from modelsurgery.editing.data import (
    read_jsonl,
    resolve_data_file,
    shared_data_path,
    split_indices,
)

MISSING = -100  # a concept without a label: no loss, not scored (torch's ignore_index)
CEBAB_LABELS = ("1", "2", "3", "4", "5")


@dataclass(frozen=True)
class ConceptExample:
    text: str
    label: int  # index into the label names
    concepts: tuple[int, ...]  # per concept an index into CONCEPT_VALUES, or MISSING


@dataclass(frozen=True)
class ConceptData:
    train: list[ConceptExample]
    evaluation: list[ConceptExample]
    labels: tuple[str, ...]


def concept_index(value: object) -> int:
    """CONCEPT_VALUES index of a label; MISSING for an absent or undecided one."""
    return CONCEPT_VALUES.index(value) if value in CONCEPT_VALUES else MISSING


def _cebab_rows(relative: str, concepts: Sequence[str]) -> list[ConceptExample]:
    rows = json.loads(shared_data_path(relative).read_text(encoding="utf-8"))
    out = []
    for row in rows:
        label = row.get("review_majority")
        if label not in CEBAB_LABELS:  # "no majority": no task label
            continue
        codes = tuple(concept_index(row.get(f"{name}_aspect_majority")) for name in concepts)
        out.append(ConceptExample(row["description"], CEBAB_LABELS.index(label), codes))
    return out


def _file_rows(path: Path, concepts: Sequence[str]) -> tuple[list[ConceptExample], tuple[str, ...]]:
    records = []
    for number, record in read_jsonl(path, "examples_file"):
        where = f"examples_file: line {number} of {path.name}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: not a JSON object")
        text, label, given = record.get("text"), record.get("label"), record.get("concepts", {})
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: 'text' must be a non-empty string")
        if not isinstance(label, str | int) or isinstance(label, bool):
            raise ValueError(f"{where}: 'label' must be a string or an integer")
        if not isinstance(given, dict):
            raise ValueError(f"{where}: 'concepts' must be an object")
        for name, value in given.items():
            if name in concepts and value not in CONCEPT_VALUES:
                raise ValueError(
                    f"{where}: concepts.{name} must be one of {', '.join(CONCEPT_VALUES)}"
                )
        records.append((text, str(label), tuple(concept_index(given.get(n)) for n in concepts)))
    labels = tuple(sorted({label for _, label, _ in records}))
    if len(labels) < 2:
        raise ValueError("examples_file: the examples need at least two distinct labels")
    return [ConceptExample(t, labels.index(lab), c) for t, lab, c in records], labels


def _subset(examples: list[ConceptExample], limit: int | None, seed: int) -> list[ConceptExample]:
    if limit is None or limit >= len(examples):
        return examples
    chosen = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in chosen]


def load_concept_data(config: ConceptBottleneckConfig, data_roots: Sequence[Path]) -> ConceptData:
    """Training and evaluation examples the config names, subsets applied."""
    if config.dataset == "cebab":
        train = _cebab_rows(CEBAB_TRAIN, config.concepts)
        evaluation = _cebab_rows(CEBAB_DEV, config.concepts)
        labels = CEBAB_LABELS
    else:
        assert config.examples_file is not None
        if not data_roots:
            raise ValueError("examples_file: this server allows no data files (no data roots)")
        path = resolve_data_file(config.examples_file, data_roots, "examples_file")
        rows, labels = _file_rows(path, config.concepts)
        if len(rows) < 2:
            raise ValueError("examples_file: need at least 2 examples (one is held out)")
        fit, held = split_indices(len(rows), config.eval_fraction, config.seed)
        train, evaluation = [rows[i] for i in fit], [rows[i] for i in held]
    return ConceptData(
        train=_subset(train, config.train_limit, config.seed),
        evaluation=_subset(evaluation, config.eval_limit, config.seed + 1),
        labels=labels,
    )
