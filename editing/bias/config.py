"""The ``mask_biased_heads`` job config: which contrast pairs, how heads are scored and chosen."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    bias_types: list[str] | None = None
    pairs: list[PairSpec] | None = Field(default=None, max_length=limits.MAX_PAIRS)
    pairs_file: str | None = None
    max_pairs: int | None = Field(default=None, ge=2, le=limits.MAX_PAIRS)
    holdout_fraction: float = Field(default=0.5, gt=0.0, lt=1.0)
    seed: int = 0
    top_k: int | None = Field(default=None, ge=1, le=limits.MAX_HEADS)
    z_threshold: float | None = None
    objective: Literal["share", "gap"] = "share"
    share_temperature: float = Field(default=1.0, gt=0.0)
    rank_by: Literal["gradient", "shortlist", "ablation"] = "shortlist"
    shortlist_size: int = Field(default=16, ge=1, le=limits.MAX_HEADS)
    perplexity_penalty: float = Field(default=1.0, ge=0.0)
    calibration_windows: int = Field(default=8, ge=1, le=limits.MAX_CALIBRATION_SAMPLES)
    batch_size: int = Field(default=16, ge=1, le=limits.MAX_BATCH_SIZE)
    evaluate_perplexity: bool = True

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
