"""Paths to the shared data sets and calibration text, with clear errors when they are absent.

Torch is imported by the two window builders alone: the thin client's configs resolve paths."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from pydantic import ValidationError

DATA_ENV = "MODELSURGERY_DATA"
# Shipped data sets under the shared data folder that configs may name (``shared_data``).
CROWS_PAIRS_PATH = "crows-pairs/crows_pairs_anonymized.csv"
WINOGENDER_DIR = "winogender"


def shared_data_dir() -> Path:
    """``$MODELSURGERY_DATA``, else ``shared/data`` beside the project root."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data_path(relative: str) -> Path:
    path = shared_data_dir() / relative
    if not path.exists():
        # The folder itself is not named: a remote caller must not learn server paths.
        raise FileNotFoundError(
            f"data file {relative!r} is not in the shared data folder; set {DATA_ENV} to the "
            "folder that holds counterfact/, wikitext-2/, crows-pairs/"
        )
    return path


def calibration_windows(
    tokenizer: object,
    num_windows: int,
    window: int,
    *,
    seed: int = 0,
    path: Path | None = None,
) -> torch.Tensor:
    """``num_windows`` random token windows of length ``window`` from WikiText-2 validation
    text (calibration data; never the text perplexity is reported on). Shape [n, window]."""
    import torch

    text = (path or shared_data_path("wikitext-2/valid.tokens")).read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() <= window:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than window {window}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - window) for _ in range(num_windows)]
    return torch.stack([ids[s : s + window] for s in starts])


def resolve_data_file(path: str, data_roots: Sequence[Path], field: str) -> Path:
    """A user file that must lie under one of the allowed data roots (relative paths are
    resolved against each root in turn)."""
    roots = [root.resolve() for root in data_roots]
    candidates = [Path(path)] if Path(path).is_absolute() else [r / path for r in roots]
    for candidate in candidates:
        resolved = candidate.resolve()
        if any(resolved.is_relative_to(root) for root in roots) and resolved.is_file():
            return resolved
    raise ValueError(f"{field}: {path!r} is not a file under the allowed data roots")


def resolve_text_source(value: str, data_roots: Sequence[Path], field: str) -> Path:
    """A text file named by a job: under one of the data roots, or a shared data set by its
    relative name (``wikitext-2/valid.tokens``), the way calibration defaults find theirs."""
    try:
        return resolve_data_file(value, data_roots, field)
    except ValueError:
        shared = shared_data_dir().resolve()
        candidate = (shared / value).resolve()
        inside = not Path(value).is_absolute() and candidate.is_relative_to(shared)
        if inside and candidate.is_file():
            return candidate
        raise ValueError(
            f"{field}: {value!r} is not a file under the allowed data roots or the shared data"
        ) from None


def read_utf8(path: Path, field: str) -> str:
    """A user file's text; one that is not UTF-8 is named by its file name and byte offset."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{field}: {path.name} is not UTF-8 text (byte {exc.start})") from None


def read_jsonl(path: Path, field: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a user's JSONL file. A line that
    is not JSON is named by number and file name, never quoted: the file may hold secrets."""
    for number, line in enumerate(read_utf8(path, field).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{field}: line {number} of {path.name}: not valid JSON "
                f"({exc.msg.lower()} at column {exc.colno})"
            ) from None


def validation_problem(exc: ValidationError) -> str:
    """A pydantic error as ``where: what`` for each problem, without the input values (its
    ``str`` quotes them) or the name of an unexpected key (which is data too)."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = [str(part) for part in error["loc"]]
        if error["type"] == "extra_forbidden":
            loc, what = loc[:-1], "unexpected field"
        else:
            what = error["msg"]
        problems.append(f"{'.'.join(loc)}: {what}" if loc else what)
    return "; ".join(problems)


def read_text(path: Path, field: str) -> str:
    """A plain text file, or the ``text`` fields of a JSONL file joined by blank lines."""
    if path.suffix != ".jsonl":
        return read_utf8(path, field)
    texts = []
    for number, record in read_jsonl(path, field):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{field}: line {number} of {path.name} has no string field 'text'")
        texts.append(record["text"])
    return "\n\n".join(texts)


def text_windows(
    tokenizer: object, text: str, num_windows: int, window: int, seed: int, field: str
) -> torch.Tensor:
    """``num_windows`` seeded random token windows of a user's text, shape [n, window];
    shorter text gives shorter windows."""
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids[0]  # type: ignore[operator]
    if ids.numel() < 2:
        raise ValueError(f"{field}: the text has fewer than 2 tokens")
    window = min(window, int(ids.numel()))
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - window + 1) for _ in range(num_windows)]
    return torch.stack([ids[s : s + window] for s in starts])


def split_indices(
    count: int, fraction: float, seed: int, *, min_held: int = 1, min_fit: int = 1
) -> tuple[list[int], list[int]]:
    """Seeded disjoint (fit, held-out) index lists over ``count`` items:
    ``round(count * fraction)`` held out, kept within ``min_held`` .. ``count - min_fit``."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    n_held = max(0, min(count - min_fit, max(min_held, round(count * fraction))))
    return sorted(order[n_held:]), sorted(order[:n_held])
