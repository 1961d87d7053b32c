"""The ``mask_biased_heads`` job config: which contrast pairs, how heads are scored and chosen."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from modelsurgery.editing.data import CROWS_PAIRS_PATH
from modelsurgery.editing.mask_heads import config_sizes
from modelsurgery.editing.registry import MethodConfig
from modelsurgery.evaluation.metrics import PAIRS
from modelsurgery.proto import limits

DEFAULT_TOP_K = 3


class PairSpec(BaseModel):
    """A user-supplied contrast pair."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stereo: str = Field(min_length=1)
    anti: str = Field(min_length=1)


class MaskBiasedHeadsConfig(MethodConfig):
    """Find and mask the attention heads that drive stereotypical preferences.

    Pairs: ``pairs`` (inline) or ``pairs_file`` (JSONL of ``{"stereo", "anti"}`` under the
    server's data roots), else CrowS-Pairs filtered by ``bias_types`` (e.g. ``["gender"]``);
    ``max_pairs`` caps them (seeded sample). A seeded ``holdout_fraction`` of the pairs is
    never used for scoring; bias is measured on it. Heads: the ``top_k`` highest scores
    (default 3) or those with z-score above ``z_threshold``.

    Scores measure each head's effect on ``objective``: ``"share"`` (default, mean
    sigmoid(gap / ``share_temperature``), a smooth stereotype share robust to the few pairs
    with 10-20 nat gaps) or ``"gap"`` (the raw mean gap). ``rank_by``: ``"gradient"`` (one
    backward pass), ``"shortlist"`` (default: the ``shortlist_size`` best gradient heads, each
    zeroed exactly on the scoring pairs) or ``"ablation"`` (every head zeroed, L*H passes).
    Ablated heads are ranked by objective drop minus ``perplexity_penalty`` x the LM loss
    (nats/token) their removal adds on ``calibration_windows`` x 128 WikiText-2 validation
    tokens, so heads that cost fluency are passed over.

    Metrics: ``stereotype_share_before/after`` (held-out share of pairs where the stereotype is
    more likely; 0.5 = unbiased), ``bias_gap_before/after`` (mean log-likelihood gap, nats),
    ``heads_masked``, ``pairs_scored``, ``pairs_heldout``, and with ``evaluate_perplexity``
    ``perplexity_before/after/ratio`` (WikiText-2 test). Artifact ``head_scores.json``.
    """

    method: Literal["mask_biased_heads"] = "mask_biased_heads"
    data_file_fields: ClassVar[tuple[str, ...]] = ("pairs_file",)
    bias_types: list[str] | None = Field(
        default=None,
        description='CrowS-Pairs bias types to use when no pairs are given (e.g. ["gender"]; '
        "default: all).",
    )
    pairs: list[PairSpec] | None = Field(
        default=None,
        max_length=limits.MAX_PAIRS,
        description="Inline {stereo, anti} sentence pairs (instead of CrowS-Pairs).",
    )
    pairs_file: str | None = Field(
        default=None, description="JSONL of {stereo, anti} pairs under the server's data roots."
    )
    max_pairs: int | None = Field(
        default=None,
        ge=2,
        le=limits.MAX_PAIRS,
        description="Cap on the pairs used (a seeded sample).",
    )
    holdout_fraction: float = Field(
        default=0.5,
        gt=0.0,
        lt=1.0,
        description="Share of the pairs never used for scoring; bias is measured on it.",
    )
    seed: int = Field(default=0, description="Seed of the sample and the held-out split.")
    top_k: int | None = Field(
        default=None,
        ge=1,
        le=limits.MAX_HEADS,
        description="Mask this many highest-scoring heads (default 3 when z_threshold is unset).",
    )
    z_threshold: float | None = Field(
        default=None,
        description="Mask the heads whose score has a z-score above this (instead of top_k).",
    )
    objective: Literal["share", "gap"] = Field(
        default="share",
        description="share (smooth stereotype share) or gap (raw mean log-likelihood gap).",
    )
    share_temperature: float = Field(
        default=1.0,
        gt=0.0,
        description="Temperature of the share objective: mean sigmoid(gap / temperature).",
    )
    rank_by: Literal["gradient", "shortlist", "ablation"] = Field(
        default="shortlist",
        description="gradient (one backward pass), shortlist (the best gradient heads, each "
        "ablated) or ablation (every head ablated).",
    )
    shortlist_size: int = Field(
        default=16,
        ge=1,
        le=limits.MAX_HEADS,
        description="Heads ablated exactly with rank_by shortlist.",
    )
    perplexity_penalty: float = Field(
        default=1.0,
        ge=0.0,
        description="Weight of the LM loss (nats/token) a head's removal adds, subtracted from "
        "its objective drop.",
    )
    calibration_windows: int = Field(
        default=8,
        ge=1,
        le=limits.MAX_CALIBRATION_SAMPLES,
        description="WikiText-2 validation windows of 128 tokens the perplexity penalty is "
        "measured on.",
    )
    batch_size: int = Field(
        default=16, ge=1, le=limits.MAX_BATCH_SIZE, description="Pairs per forward pass."
    )
    evaluate_perplexity: bool = Field(
        default=True,
        description="Measure WikiText-2 perplexity before and after (the job's protocol).",
    )

    carries: ClassVar[frozenset[str]] = frozenset({PAIRS})

    def metric_names(self) -> set[str]:
        names = {"heads_masked", "pairs_scored", "pairs_heldout"}
        names |= {f"{m}_{w}" for m in ("stereotype_share", "bias_gap") for w in ("before", "after")}
        return names

    @model_validator(mode="after")
    def _consistent(self) -> MaskBiasedHeadsConfig:
        if self.top_k is not None and self.z_threshold is not None:
            raise ValueError("z_threshold: give either top_k or z_threshold, not both")
        if self.pairs is not None and self.pairs_file is not None:
            raise ValueError("pairs_file: give either pairs or pairs_file, not both")
        if self.pairs is not None and len(self.pairs) < 2:
            raise ValueError("pairs: need at least 2 pairs (one to score, one to hold out)")
        top_k = self.selection().get("top_k")
        if self.rank_by == "shortlist" and top_k is not None and top_k > self.shortlist_size:
            raise ValueError(f"shortlist_size: {self.shortlist_size} is below top_k {top_k}")
        return self

    def shared_data(self) -> dict[str, tuple[str, ...]]:
        """Without pairs of its own, the method scores CrowS-Pairs."""
        return {"pairs": (CROWS_PAIRS_PATH,)} if self.pairs is None and not self.pairs_file else {}

    def selection(self) -> dict[str, Any]:
        if self.z_threshold is not None:
            return {"z_threshold": self.z_threshold}
        return {"top_k": self.top_k or DEFAULT_TOP_K}

    def resolved(self, model_config: Any) -> MaskBiasedHeadsConfig:
        """The head selection as ``run`` applies it (``top_k`` defaults without a z cut)."""
        return self.model_copy(update=self.selection())

    def check_against(self, model_config: Any) -> None:
        layers, heads = config_sizes(model_config)
        top_k = self.selection().get("top_k")
        if top_k is not None and top_k > layers * heads:
            raise ValueError(f"top_k: {top_k} exceeds the model's {layers * heads} heads")
