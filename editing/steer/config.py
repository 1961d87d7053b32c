"""``steer`` job config: contrastive activation addition."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from modelsurgery.editing.contrast import PairsSource
from modelsurgery.editing.knowledge.config import check_layer
from modelsurgery.editing.mask_heads import config_sizes
from modelsurgery.editing.registry import MethodConfig

# Chosen on SmolLM2-135M by benchmarks/steer_sentiment.py --tune on its 20 dev prompts (never
# the 50 it reports on), 16 sentiment pairs, WikiText-2 ratio on 2,048 tokens. The rule: the
# largest coefficient whose perplexity ratio stays within 1.10. Mean aggregate, mean token:
# layer 10 of 30: coefficient 1.25 -> positive share 0.75 (base 0.40) at ratio 1.081; 1.5 ->
# 0.75 at 1.115; 2.0 -> 0.80 at 1.206. Layer 8: 1.0 -> 0.60 at 1.060; layers 12 and 16 carry
# SmolLM2's massive activations (|v| 88 at 0.5, ratio 1.84 and 1.32). Last-token reading and
# the PCA aggregate were no better (layer 10: 0.70 at 1.12 and 0.70 at 1.10), nor were
# several layers at once (PCA, 6,8,10 at 0.75: 0.75 at 1.149). As a depth fraction the layer
# carries over to other depths; the mean difference already scales with the residual norm.
DEFAULT_DEPTH_FRACTION = 1 / 3
DEFAULT_COEFFICIENT = 1.25


class SteerConfig(MethodConfig, PairsSource):
    """Steer a model toward the ``positive`` side of contrast pairs (Turner et al. 2023,
    activation addition; Rimsky et al. 2024, contrastive activation addition).

    pairs / pairs_file: the contrast pairs (``{"positive": ..., "negative": ...}``; a file is
        JSONL under the server's data roots).
    layers: decoder layers whose output gets the vector (default: the layer at one third of
        the depth; layer 10 of SmolLM2-135M's 30).
    coefficient: the vector added is ``coefficient`` x the direction; negative steers away.
    aggregate: ``mean`` (mean of positive - negative activations) or ``pca`` (their first
        principal component, scaled to the mean difference's length along it).
    token: activations read at each text's ``last`` token or averaged over its tokens
        (``mean``, default: sentiment is spread over a sentence).
    positions: ``all`` adds the vector at every position (what a bias does); ``generated``
        only where new tokens are predicted (the prompt's last token and every decoding step),
        leaving the prompt's own states alone; that one stays a hook. (A no-cache call, such
        as a perplexity window, is a prompt call: only its last position is steered.)
    bake: write the vectors as biases of each layer's MLP output projection, so plain
        ``from_pretrained`` loads the steered model (Llama's ``mlp_bias``; GPT-2, Phi, OPT,
        GPT-NeoX, GPT-J have the bias already). Default: where the family allows it and
        ``positions`` is ``all``; otherwise the vectors are stored as hooks, attached by
        ``modelsurgery.models.load`` and the server's Generate (a leaf: nothing builds on it).
    holdout_fraction: pairs kept out of the fit to measure the direction on (seeded by
        ``seed``); 0 fits on all.

    Metrics: ``projection_before`` / ``projection_after`` (mean projection of the held-out
    pairs' activations at the steered layers on the unit direction, before and with the
    steering; all pairs when none is held out), ``heldout_separation`` (mean projection of
    their positive minus negative sides: > 0 when the direction generalises), ``vector_norm``
    (mean length of the added vectors), ``baked`` (1 or 0), ``pairs_fitted``, and with
    ``evaluate_perplexity`` ``perplexity_before/after/ratio`` (WikiText-2 test).
    """

    method: Literal["steer"] = "steer"
    data_file_fields: ClassVar[tuple[str, ...]] = ("pairs_file",)
    layers: list[int] | None = Field(default=None, min_length=1)
    coefficient: float = DEFAULT_COEFFICIENT
    aggregate: Literal["mean", "pca"] = "mean"
    token: Literal["last", "mean"] = "mean"
    positions: Literal["all", "generated"] = "all"
    bake: bool | None = None
    holdout_fraction: float = Field(default=0.25, ge=0.0, lt=1.0)
    seed: int = Field(default=0, description="Seed of the held-out split.")
    evaluate_perplexity: bool = Field(
        default=True,
        description="Measure WikiText-2 perplexity before and after (the job's protocol).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> SteerConfig:
        if self.bake and self.positions != "all":
            raise ValueError("bake: a bias adds at every position; positions 'generated' is a hook")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError("layers: each layer at most once")
        return self

    def metric_names(self) -> set[str]:
        names = {"projection_before", "projection_after", "heldout_separation", "vector_norm"}
        names |= {"baked", "pairs_fitted"}
        return names

    def layer_indices(self, model_config: Any) -> list[int]:
        if self.layers is not None:
            return list(self.layers)
        return [int(config_sizes(model_config)[0] * DEFAULT_DEPTH_FRACTION)]

    def resolved(self, model_config: Any) -> SteerConfig:
        """The steered layers as ``run`` picks them. ``bake`` is decided on a meta-device model
        (torch), so ``run`` reports it."""
        return self.model_copy(update={"layers": self.layer_indices(model_config)})

    def bakes(self, model_config: Any) -> bool:
        """Whether ``run`` writes biases (else it stores hooks)."""
        from modelsurgery.models.output_bias import bias_overrides

        if self.bake is False or self.positions != "all":
            return False
        return bias_overrides(model_config, "mlp_out") is not None

    def leaves_hooks(self, model_config: Any) -> bool:
        return not self.bakes(model_config)

    def check_against(self, model_config: Any) -> None:
        count = config_sizes(model_config)[0]
        for i, layer in enumerate(self.layer_indices(model_config)):
            check_layer(f"layers[{i}]", layer, count)
        if self.bake and not self.bakes(model_config):
            raise ValueError(
                f"bake: {model_config.model_type} has no MLP output bias to bake into; "
                "leave bake unset to store the vectors as hooks"
            )
