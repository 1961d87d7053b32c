"""Contrast pairs given inline (``pairs``) or as JSONL under the data roots (``pairs_file``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from modelsurgery.editing.data import read_jsonl, resolve_data_file, split_indices
from modelsurgery.proto import limits


class TextPair(BaseModel):
    """Two texts that differ in the property to steer toward (``positive``) or away from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    positive: str = Field(min_length=1)
    negative: str = Field(min_length=1)


class PairsSource(BaseModel):
    """Config fields of a method fitted on contrast pairs: exactly one of ``pairs`` and
    ``pairs_file`` (one ``{"positive": ..., "negative": ...}`` object per line)."""

    pairs: list[TextPair] | None = Field(
        default=None,
        max_length=limits.MAX_PAIRS,
        description="Inline contrast pairs {positive, negative}.",
    )
    pairs_file: str | None = Field(
        default=None,
        description="JSONL of {positive, negative} pairs under the server's data roots.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> PairsSource:
        if (self.pairs is None) == (self.pairs_file is None):
            raise ValueError("pairs: give exactly one of pairs and pairs_file")
        if self.pairs is not None and len(self.pairs) < 2:
            raise ValueError("pairs: at least 2 contrast pairs are needed")
        return self


def read_pairs_jsonl(path: Path) -> list[TextPair]:
    pairs = []
    for lineno, row in read_jsonl(path, "pairs_file"):
        try:
            pairs.append(TextPair.model_validate(row))
        except ValueError:
            raise ValueError(
                f"pairs_file: line {lineno} of {path.name} is not an object with 'positive' "
                "and 'negative' texts"
            ) from None
    if len(pairs) < 2:
        raise ValueError(f"pairs_file: at least 2 contrast pairs are needed, found {len(pairs)}")
    return pairs


def load_text_pairs(source: PairsSource, data_roots: Sequence[Path]) -> list[TextPair]:
    if source.pairs is not None:
        return list(source.pairs)
    assert source.pairs_file is not None
    return read_pairs_jsonl(resolve_data_file(source.pairs_file, data_roots, "pairs_file"))


def split_held_out(
    pairs: Sequence[TextPair], fraction: float, seed: int
) -> tuple[list[TextPair], list[TextPair]]:
    """Seeded disjoint (fit, held-out) split; the held-out side is empty for ``fraction`` 0,
    and the fit side keeps at least 2 pairs."""
    fit, held = split_indices(len(pairs), fraction, seed, min_held=0, min_fit=2)
    return [pairs[i] for i in fit], [pairs[i] for i in held]
