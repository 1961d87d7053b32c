"""Paths to the shared data sets and calibration text, with clear errors when they are absent."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path

import torch

DATA_ENV = "MODELSURGERY_DATA"


def shared_data_dir() -> Path:
    """``$MODELSURGERY_DATA``, else ``shared/data`` beside the project root."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data_path(relative: str) -> Path:
    path = shared_data_dir() / relative
    if not path.exists():
        raise FileNotFoundError(
            f"data file {relative!r} not found under {shared_data_dir()}; "
            f"set {DATA_ENV} to the folder that holds counterfact/, wikitext-2/, crows-pairs/"
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


def split_indices(
    count: int, fraction: float, seed: int, *, min_held: int = 1, min_fit: int = 1
) -> tuple[list[int], list[int]]:
    """Seeded disjoint (fit, held-out) index lists over ``count`` items:
    ``round(count * fraction)`` held out, kept within ``min_held`` .. ``count - min_fit``."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    n_held = max(0, min(count - min_fit, max(min_held, round(count * fraction))))
    return sorted(order[n_held:]), sorted(order[:n_held])
