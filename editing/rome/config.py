"""ROME job config."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from modelsurgery.editing.knowledge.config import (
    KnowledgeEditConfig,
    check_layer,
    depth_layer,
    family_defaults,
    layer_count,
)
from modelsurgery.editing.knowledge.facts import Fact
from modelsurgery.proto import limits


class RomeConfig(KnowledgeEditConfig):
    """Rank-one model editing (Meng et al., 2022): one fact per edit, one MLP layer; a list of
    facts is applied one after another.

    layer: the edited down projection (default: family default; SmolLM2-135M: layer 5).
    use_mom2: whiten the key with C = E[k k^T] (ROME's "mom2 adjustment"); off = plain
        least-norm rank-one update along the key.
    facts: 1 to 1,000 facts, applied one after another (``memit`` writes batches).
    Shared fields: see ``KnowledgeEditConfig``.

    Metrics: ``efficacy``, ``paraphrase``, ``locality``, ``probability_gain`` (after all facts,
    versus the model before the job), ``perplexity_before``, ``perplexity_after``,
    ``perplexity_ratio``, ``v_loss`` (mean final v* loss), ``v_steps_used`` (mean steps).

    Llama defaults: layer 5 of 30 (SmolLM2-135M), 25 steps, lr 0.5, KL 0.0625, weight decay
    1e-3, clamp 4, mom2 on. Weight decay 0.5 (ROME's GPT-2 XL value) left the v* loss on a
    plateau above the 0.05 early-stop threshold on SmolLM2 (0.063 after 25 steps on dev case
    0, so every edit ran all steps); 1e-3 (EasyEdit's Llama value) stops after ~17 steps with
    the edit intact. Figures: ``benchmarks/counterfact.py`` and the project report.
    """

    method: Literal["rome"] = "rome"
    facts: list[Fact] = Field(min_length=1, max_length=limits.MAX_ROME_FACTS)
    layer: int | None = Field(default=None, ge=0)
    use_mom2: bool = True

    def edit_layer(self, model_config: Any) -> int:
        if self.layer is not None:
            return self.layer
        defaults = family_defaults(getattr(model_config, "model_type", None))
        return depth_layer(defaults.rome_layer, layer_count(model_config))

    def resolved(self, model_config: Any) -> RomeConfig:
        """The layer and every hyperparameter as ``run`` picks them for this model."""
        defaults = family_defaults(getattr(model_config, "model_type", None))
        update = self.shared_settings(defaults, defaults.rome_clamp)
        return self.model_copy(update={**update, "layer": self.edit_layer(model_config)})

    def check_against(self, model_config: Any) -> None:
        self.check_v_loss_layer(model_config)
        check_layer("layer", self.edit_layer(model_config), layer_count(model_config))
