"""Concept subnetworks (SparseCBM, Tan et al. AAAI 2024) as the ``concept_bottleneck``
surgery method.

A version stores the bottleneck (per-concept masks, the masked layers' trained weights,
concept and label heads), not weights; it attaches through the registry's seam
(``editing.attachments``) and leaves the model's own outputs alone: ``attached_bottleneck``
then serves ``predict_concepts`` (with intervention on a user's corrections). Like ReFT it is
a leaf: its layers were trained on its exact base weights.

The config is torch-free (registered on import); the rest is imported on first use.
"""

from modelsurgery.editing.concepts.config import ConceptBottleneckConfig
from modelsurgery.editing.lazy import lazy_exports
from modelsurgery.editing.registry import Attachment, Implementation, register_method

LOADING = (
    "The concept bottleneck (`concepts/config.json`, `concepts/state.safetensors`) sits beside "
    "the unchanged weights: `AutoModelForCausalLM.from_pretrained(folder)` loads the base model. "
    "Load the folder with `modelsurgery.models.load(folder)`, which attaches it; then "
    "`predict_concepts(model, tokenizer, attached_bottleneck(model), texts)` (both in "
    "`modelsurgery.editing.concepts`) predicts concepts and intervenes."
)


def _implementation() -> Implementation:
    from modelsurgery.editing.concepts.artifacts import (
        CONFIG_ARTIFACT,
        STATE_ARTIFACT,
        attach_bottleneck,
    )
    from modelsurgery.editing.concepts.method import run

    attachment = Attachment(
        artifacts=(CONFIG_ARTIFACT, STATE_ARTIFACT), attach=attach_bottleneck, loading=LOADING
    )
    return Implementation(run, attachment)


register_method("concept_bottleneck", ConceptBottleneckConfig, _implementation)

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        ".artifacts": (
            "CONFIG_ARTIFACT",
            "STATE_ARTIFACT",
            "attach_bottleneck",
            "attached_bottleneck",
        ),
        ".explain": ("token_attributions",),
        ".predict": ("ConceptPrediction", "predict_concepts"),
    },
)

__all__ = [
    "CONFIG_ARTIFACT",
    "LOADING",
    "STATE_ARTIFACT",
    "ConceptBottleneckConfig",
    "ConceptPrediction",
    "attach_bottleneck",
    "attached_bottleneck",
    "predict_concepts",
    "token_attributions",
]
