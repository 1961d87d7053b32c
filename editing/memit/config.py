"""MEMIT job config."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from modelsurgery.editing.knowledge.config import (
    KnowledgeEditConfig,
    ascending_layers,
    check_layer,
    family_defaults,
    layer_count,
    multi_layer_edit_layers,
)
from modelsurgery.editing.knowledge.facts import Fact
from modelsurgery.editing.knowledge.templates import DEFAULT_CONTEXT_TEMPLATES
from modelsurgery.proto import limits


class ScaleDefaults(BaseModel):
    """What ``memit`` picks for a job of at least ``from_facts`` facts (``SCALE_RULE``)."""

    from_facts: int
    targets: Literal["fast", "optimised"]
    chunk_size: int
    target_anchor: float
    mom2_weight: float | None = None
    # The first n of the default context templates (bare prompt first); None = all.
    templates: int | None = None


# The defaults' rule by number of facts: see the MemitConfig docstring and
# docs/knowledge_at_scale.md for the dev figures behind each row.
SCALE_RULE: tuple[ScaleDefaults, ...] = (
    ScaleDefaults(
        from_facts=1, targets="optimised", chunk_size=limits.MAX_MEMIT_FACTS, target_anchor=1.0
    ),
)


def scale_defaults(facts: int) -> ScaleDefaults:
    return [row for row in SCALE_RULE if row.from_facts <= facts][-1]


class MemitConfig(KnowledgeEditConfig):
    """Mass-editing memory in a transformer (Meng et al., 2023): a batch of facts written at
    once, the change spread over a range of MLP layers.

    facts: 1 to 10,000 facts.
    layers: ascending edited layers (default: family default; SmolLM2-135M: 2-8).
    mom2_weight: lambda, weight of C = E[k k^T] against the new keys (larger = more
        conservative edits).
    fact_batch: facts whose v* are optimised together, cut from the facts sorted by length
        (``knowledge.targets``); ``benchmarks/vstar_batches.py`` times batch sizes and dtypes.
    targets: ``optimised`` (v*, 25 Adam steps per fact), ``fast`` (one forward + backward per
        fact: the normalised one-step target of UltraEdit, norm-anchored; ``knowledge.gradients``)
        or ``auto`` (by the number of facts, ``SCALE_RULE``).
    chunk_size: facts per solve; each chunk keeps the keys of the earlier ones
        (``knowledge.chunks``). Default by ``SCALE_RULE``.
    target_anchor: a fast target's length as a multiple of the output's norm (default by rule).
    second_pass: facts that did not take after their chunk (forward-only check) get fresh
        targets on the edited model and a second solve.
    Shared fields: see ``KnowledgeEditConfig``.

    Defaults by number of facts (``SCALE_RULE``; figures in docs/knowledge_at_scale.md): v*
    with every context template, all facts in one solve, no second pass, at every size. Fast
    targets (anchor 1, 2 templates) looked close on dev cases 1000-1099 as one 100-fact job
    (0.94 / 0.76 / 0.893, perplexity ratio 1.035, against v*'s 0.97 / 0.92 / 0.91) but fell
    apart held out at 1,000 facts (cases 5000-5999, chunks of 250 with a second pass: 0.784 /
    0.655 / 0.584, perplexity ratio 2.198; v* gave 0.916 / 0.819 / 0.682 and 1.323 on cases
    0-999 in the last round), so they are opt-in (``targets: fast``) until they hold there. Layers
    spread upward past the family's range when the facts outnumber half a layer's
    key width per layer (``knowledge.config.spread_layers``; SmolLM2-135M: 2-15 at 10,000).

    Llama defaults (SmolLM2-135M): layers 2-8, clamp 4, lambda 5000, weight decay 1e-3, 25
    steps, lr 0.5. Chosen on CounterFact dev cases 1000-1199 as one 200-fact batch with the v*
    targets held fixed (efficacy / paraphrase / locality): layers 3-8 with clamp 0.75 and
    lambda 15000 (GPT-J's values) reached only 0.71 / 0.64 / 0.87 on cases 0-199, because v*
    could not reach the target inside the small clamp; with clamp 4, layers 2-8: lambda 5000
    0.96 / 0.89 / 0.81, lambda 7500 0.95 / 0.87 / 0.83; at 100 facts (cases 1000-1099)
    lambda 5000 gave 0.97 / 0.92 / 0.91 and layers 3-8 0.96 / 0.90 / 0.90. Lower lambda buys
    efficacy with locality (1000: 0.99 / 0.92 / 0.86 at 100 facts); an AlphaEdit-style
    null-space projection did not help locality here (0.98 / 0.91 / 0.80 at 200 facts). The
    locality lost grows with the batch: neighbourhood prompts share the edited relations.
    Lambda is not scaled with the batch although K K^T grows with it: on dev cases 8000-8299 as
    one 300-fact batch (``benchmarks/memit_sweep.py --n 300 --offset 8000 --grid 2:5000
    2:15000``, AMD EPYC, AVX2, 1 thread), lambda 5000 gave 0.96 / 0.88 / 0.79 with perplexity
    ratio 1.091, lambda 15000 (the same lambda per fact as 5000 at 100 facts) 0.83 / 0.77 /
    0.83 and 1.044: efficacy falls nearly four times faster than locality rises.

    ``projection: null_space`` defaults (cut 2, ridge 10, ``nullspace_mom2`` on), chosen on dev
    cases 9000-9099 as one 100-fact batch with the v* targets fixed (``benchmarks/memit_sweep.py
    --n 100 --offset 9000 --null-space 1 2 --ridge 10 1000 --nullspace-mom2 0 5000``):
    unprojected lambda 5000 0.97 / 0.89 / 0.89; cut 1, ridge 10: 0.98 / 0.92 / 0.83 without
    lambda * C inside, 0.92 / 0.83 / 0.91 with it; cut 1, ridge 1000: 0.97 / 0.89 / 0.88 and
    0.87 / 0.76 / 0.93; cut 2, ridge 10: 0.99 / 0.92 / 0.82 and 0.96 / 0.85 / 0.90; cut 2,
    ridge 1000: 0.98 / 0.91 / 0.87 and 0.94 / 0.84 / 0.91. SmolLM2's C has no null space (its
    smallest eigenvalue is 0.27-0.37 of the median in layers 2-8), so in one job the projection
    moves along the same efficacy / locality trade-off as lambda; what it adds is the earlier
    edits' keys of a lineage (sequential editing). On the same dev cases as a chain of 10 jobs
    of 10 facts (``benchmarks/memit_scale.py --sequential 100 --per-job 10 --offset 9000``),
    unprojected 0.98 / 0.90 / 0.887 with perplexity ratio 1.045 against the root, projected
    0.96 / 0.88 / 0.920 and 1.025 (float32 v*, Intel Xeon, 2 threads). Hence the default
    ``projection: auto``: ``null_space`` for a layer that carries earlier edits' keys, ``none``
    for the first edit of a layer.

    ``vstar_dtype: auto`` (bfloat16 where it is fast) was checked on dev cases 9000-9099 as
    one 100-fact job (``benchmarks/memit_scale.py --memit-n 100 --offset 9000 --projection none
    --vstar-dtype float32 auto``): float32 0.97 / 0.89 / 0.89, perplexity ratio 1.037, 3.64 s
    per fact; bfloat16 0.97 / 0.88 / 0.895, 1.037, 2.36 s per fact (0.65x).

    Metrics: ``efficacy``, ``paraphrase``, ``locality``, ``probability_gain``,
    ``perplexity_before``, ``perplexity_after``, ``perplexity_ratio``, ``v_loss``,
    ``v_steps_used``.
    """

    method: Literal["memit"] = "memit"
    facts: list[Fact] = Field(min_length=1, max_length=limits.MAX_MEMIT_FACTS)
    layers: list[int] | None = Field(default=None, min_length=1)
    mom2_weight: float | None = Field(default=None, gt=0)
    fact_batch: int = Field(default=16, ge=1, le=limits.MAX_BATCH_SIZE)
    targets: Literal["auto", "fast", "optimised"] = "auto"
    chunk_size: int | None = Field(default=None, ge=1, le=limits.MAX_MEMIT_FACTS)
    target_anchor: float | None = Field(default=None, gt=0)
    second_pass: bool = False

    _ascending = field_validator("layers")(ascending_layers)

    def edit_layers(self, model_config: Any) -> list[int]:
        return multi_layer_edit_layers(self.layers, len(self.facts), model_config)

    def scale(self) -> ScaleDefaults:
        return scale_defaults(len(self.facts))

    def target_kind(self) -> Literal["fast", "optimised"]:
        return self.scale().targets if self.targets == "auto" else self.targets

    def chunk_facts(self) -> int:
        return self.chunk_size or self.scale().chunk_size

    def templates(self) -> tuple[str, ...]:
        """The spec's templates, else the defaults cut to the rule's count."""
        if self.context_templates is not None:
            return tuple(self.context_templates)
        return DEFAULT_CONTEXT_TEMPLATES[: self.scale().templates]

    def anchor(self) -> float:
        return self.target_anchor or self.scale().target_anchor

    def lambda_weight(self, model_config: Any) -> float:
        if self.mom2_weight is not None:
            return self.mom2_weight
        if self.scale().mom2_weight is not None:
            return self.scale().mom2_weight
        return family_defaults(getattr(model_config, "model_type", None)).mom2_weight

    def resolved(self, model_config: Any) -> MemitConfig:
        """The layers, lambda and every hyperparameter as ``run`` picks them for this model."""
        defaults = family_defaults(getattr(model_config, "model_type", None))
        update = self.shared_settings(defaults, defaults.memit_clamp)
        update["layers"] = self.edit_layers(model_config)
        update["mom2_weight"] = self.lambda_weight(model_config)
        update["targets"] = self.target_kind()
        update["chunk_size"] = self.chunk_facts()
        update["target_anchor"] = self.anchor()
        update["context_templates"] = list(self.templates())
        return self.model_copy(update=update)

    def metric_names(self) -> set[str]:
        return super().metric_names() | {"second_pass_facts"}

    def check_against(self, model_config: Any) -> None:
        self.check_v_loss_layer(model_config)
        n = layer_count(model_config)
        for i, layer in enumerate(self.edit_layers(model_config)):
            check_layer(f"layers[{i}]", layer, n)


__all__ = ["Fact", "MemitConfig"]
