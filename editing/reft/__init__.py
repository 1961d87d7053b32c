"""ReFT (representation finetuning, Wu et al. 2024) as the ``reft`` surgery method.

A ReFT version stores interventions, not weights; they attach through the registry's seam
(``editing.attachments``). Directly: ``attach_interventions(model, artifacts)`` or
``attach_from_folder(model, folder)`` return a handle whose hooks make ``model(...)`` and
``model.generate(...)`` apply them; ``handle.remove()`` detaches them.

Lineage: a ReFT version is a leaf. Its interventions were trained on the hidden states of its
exact weights; a later weight edit changes those states and silently invalidates them, and a
second ReFT on top would need the first one's hooks live while training. So ``reft`` runs last
in its job and no job builds on its version: edit the weights first, then run ReFT.
"""

from modelsurgery.editing.examples import Example
from modelsurgery.editing.reft.artifacts import (
    CONFIG_ARTIFACT,
    TENSORS_ARTIFACT,
    attach_from_folder,
    attach_interventions,
)
from modelsurgery.editing.reft.config import ReftConfig
from modelsurgery.editing.reft.hooks import InterventionHandle
from modelsurgery.editing.reft.method import run
from modelsurgery.editing.registry import Attachment, register_method

LOADING = (
    "ReFT interventions (`reft/config.json`, `reft/interventions.safetensors`) act on hidden "
    "states through forward hooks and cannot be merged into the weights: plain "
    "`AutoModelForCausalLM.from_pretrained(folder)` loads the unedited base model. Load the "
    "folder with `modelsurgery.models.load(folder)`, whose `loaded.model(...)` and "
    "`loaded.model.generate(...)` apply them, or attach them to a model you loaded yourself "
    "with `modelsurgery.editing.reft.attach_from_folder(model, folder)`."
)

register_method(
    "reft",
    ReftConfig,
    run,
    Attachment(
        artifacts=(CONFIG_ARTIFACT, TENSORS_ARTIFACT),
        attach=attach_interventions,
        loading=LOADING,
    ),
)

__all__ = [
    "CONFIG_ARTIFACT",
    "LOADING",
    "TENSORS_ARTIFACT",
    "Example",
    "InterventionHandle",
    "ReftConfig",
    "attach_from_folder",
    "attach_interventions",
    "run",
]
