"""UltraEdit job config."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from modelsurgery.editing.knowledge.config import (
    ascending_layers,
    check_layer,
    layer_count,
    multi_layer_edit_layers,
)
from modelsurgery.editing.knowledge.facts import Fact
from modelsurgery.editing.registry import MethodConfig
from modelsurgery.evaluation.metrics import FACT_METRICS, FACTS
from modelsurgery.proto import limits


class UltraEditConfig(MethodConfig):
    """UltraEdit (Gu et al., TMLR 2026; XiaojieGu/UltraEdit): lifelong, training-free editing.
    Per fact one forward and one backward pass read each edited down projection's input k and
    the gradient g of the target's NLL with respect to its output; [k, g] are normalised with
    running statistics over every fact the job has seen (one normaliser for the modules of one
    shape, as published); each fact's target output change is one normalised gradient step,
    r = -lr ||k_hat||^2 g_hat; each chunk is then solved per module with the identity
    regulariser, Delta = R^T K (K^T K + I)^-1 (raw keys). No second-moment statistics, no
    preserved keys: locality rests on the ridge. The one difference from the paper: k and g are
    read at the subject's last token of the prompt (MEMIT's site), not at the answer tokens,
    and on the down projections ``memit`` edits, so the two compare on the same modules.

    facts: 1 to 10,000 facts.
    layers: edited down projections (default: ``memit``'s range for this many facts).
    lr: eta of the one-step target, in normalised units (UltraEdit's ``lr``; its 1e-6 is for
        7B models' 18,432-wide modules). 1e-3 chosen on dev cases 1000-1099 as one 100-fact job
        (efficacy / paraphrase / locality, perplexity ratio): 1e-4 0.54 / 0.49 / 0.957, 0.998;
        1e-3 0.65 / 0.60 / 0.82, 1.106 (docs/knowledge_at_scale.md). It does not hold at scale:
        1,000 held-out facts in one chunk gave 0.52 / 0.48 / 0.31 and perplexity ratio 51.8, and
        10,000 facts 0.56 / 0.53 / 0.03 (UltraEdit as published, for comparison).
    chunk_size: facts per solve (UltraEdit's batch).
    evaluate, evaluate_perplexity: as ``memit``.

    Metrics: ``efficacy``, ``paraphrase``, ``locality``, ``probability_gain``, the perplexity
    figures, ``v_loss`` (the target NLL before the edit).
    """

    method: Literal["ultraedit"] = "ultraedit"
    facts: list[Fact] = Field(min_length=1, max_length=limits.MAX_MEMIT_FACTS)
    layers: list[int] | None = Field(default=None, min_length=1)
    lr: float = Field(default=1e-3, gt=0)
    chunk_size: int = Field(default=1000, ge=1, le=limits.MAX_MEMIT_FACTS)
    evaluate: bool = True
    evaluate_perplexity: bool = True

    carries: ClassVar[frozenset[str]] = frozenset({FACTS})

    _ascending = field_validator("layers")(ascending_layers)

    def edit_layers(self, model_config: Any) -> list[int]:
        return multi_layer_edit_layers(self.layers, len(self.facts), model_config)

    def suite(self) -> dict[str, list[dict[str, Any]]]:
        return {FACTS: [f.model_dump(mode="json", exclude_none=True) for f in self.facts]}

    def metric_names(self) -> set[str]:
        return {"v_loss"} | (set(FACT_METRICS) if self.evaluate else set())

    def resolved(self, model_config: Any) -> UltraEditConfig:
        return self.model_copy(update={"layers": self.edit_layers(model_config)})

    def check_against(self, model_config: Any) -> None:
        n = layer_count(model_config)
        for i, layer in enumerate(self.edit_layers(model_config)):
            check_layer(f"layers[{i}]", layer, n)
