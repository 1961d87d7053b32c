"""What a version is judged on, stored with it as ``evaluation/suite.json`` so any later job
(lineage) or ``modelsurgery eval`` reproduces the numbers: the facts and held-out contrast
pairs its operations carried, the reference answers measured on the model the job started
from (locality is "still the reference's argmax"), and the perplexity protocol.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from modelsurgery.editing.data import shared_data_path
from modelsurgery.editing.knowledge.facts import Fact

from .metrics import FACTS, PAIRS, EvaluationSettings

SUITE_ARTIFACT = "evaluation/suite.json"
# Bump when a metric's definition changes: numbers of different definitions never mix.
DEFINITIONS_VERSION = 1
WIKITEXT_TEST = "wikitext-2/wiki.test.raw"


class PairCase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    stereo: str
    anti: str


class PerplexityProtocol(BaseModel):
    """WikiText-2 test perplexity: first ``tokens`` tokens in windows of ``window``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: int = 4096
    window: int = 512
    dataset: str = WIKITEXT_TEST
    dataset_sha256: str = ""


class Suite(BaseModel):
    """``locality_reference[f][p]``: the reference model's argmax tokens on fact f's p-th
    locality answer (teacher-forced); empty until measured."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    definitions: int = DEFINITIONS_VERSION
    facts: list[Fact] = Field(default_factory=list)
    locality_reference: list[list[list[int]]] = Field(default_factory=list)
    pairs: list[PairCase] = Field(default_factory=list)
    perplexity: PerplexityProtocol | None = None

    @property
    def empty(self) -> bool:
        return not self.facts and not self.pairs and self.perplexity is None

    def to_bytes(self) -> bytes:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Suite:
        return cls.model_validate_json(data)


def carried_suite(parts: list[dict[str, list[dict[str, Any]]]]) -> Suite:
    """The suite of one job: every operation's ``SurgeryResult.suite`` in order."""
    facts = [Fact.model_validate(f) for part in parts for f in part.get(FACTS, [])]
    pairs = [PairCase.model_validate(p) for part in parts for p in part.get(PAIRS, [])]
    return Suite(facts=facts, pairs=pairs)


@lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def job_protocol(settings: EvaluationSettings) -> PerplexityProtocol:
    """A job's perplexity protocol, with the digest of the text it reads here."""
    path = shared_data_path(WIKITEXT_TEST)
    stat = path.stat()
    return PerplexityProtocol(
        tokens=settings.perplexity_tokens,
        window=settings.window,
        dataset_sha256=_file_sha256(str(path), stat.st_size, stat.st_mtime_ns),
    )
