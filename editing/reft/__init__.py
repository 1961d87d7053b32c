"""ReFT (representation finetuning, Wu et al. 2024) as the ``reft`` surgery method.

A ReFT version stores interventions, not weights; they attach through the registry's seam
(``editing.attachments``). Directly: ``attach_interventions(model, artifacts)`` or
``attach_from_folder(model, folder)`` return a handle whose hooks make ``model(...)`` and
``model.generate(...)`` apply them; ``handle.remove()`` detaches them.

Lineage: a ReFT version is a leaf. Its interventions were trained on the hidden states of its
exact weights; a later weight edit changes those states and silently invalidates them, and a
second ReFT on top would need the first one's hooks live while training. So ``reft`` runs last
in its job and no job builds on its version: edit the weights first, then run ReFT.

The config is torch-free (registered on import); the rest is imported on first use.
"""

from modelsurgery.editing.examples import Example
from modelsurgery.editing.lazy import lazy_exports
from modelsurgery.editing.reft.config import ReftConfig
from modelsurgery.editing.registry import Attachment, Implementation, register_method

LOADING = (
    "ReFT interventions (`reft/config.json`, `reft/interventions.safetensors`) act on hidden "
    "states through forward hooks and cannot be merged into the weights: plain "
    "`AutoModelForCausalLM.from_pretrained(folder)` loads the unedited base model. Load the "
    "folder with `modelsurgery.models.load(folder)`, whose `loaded.model(...)` and "
    "`loaded.model.generate(...)` apply them, or attach them to a model you loaded yourself "
    "with `modelsurgery.editing.reft.attach_from_folder(model, folder)`."
)


def _implementation() -> Implementation:
    from modelsurgery.editing.reft.artifacts import (
        CONFIG_ARTIFACT,
        TENSORS_ARTIFACT,
        attach_interventions,
    )
    from modelsurgery.editing.reft.method import run

    attachment = Attachment(
        artifacts=(CONFIG_ARTIFACT, TENSORS_ARTIFACT), attach=attach_interventions, loading=LOADING
    )
    return Implementation(run, attachment)


register_method("reft", ReftConfig, _implementation)

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        ".artifacts": (
            "CONFIG_ARTIFACT",
            "TENSORS_ARTIFACT",
            "attach_from_folder",
            "attach_interventions",
        ),
    },
)

__all__ = [
    "CONFIG_ARTIFACT",
    "LOADING",
    "TENSORS_ARTIFACT",
    "Example",
    "ReftConfig",
    "attach_from_folder",
    "attach_interventions",
]
