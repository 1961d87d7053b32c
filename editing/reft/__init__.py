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

from modelsurgery.editing.reft.artifacts import (
    CONFIG_ARTIFACT,
    TENSORS_ARTIFACT,
    attach_from_folder,
    attach_interventions,
)
from modelsurgery.editing.reft.config import Example, ReftConfig
from modelsurgery.editing.reft.hooks import InterventionHandle
from modelsurgery.editing.reft.method import run
from modelsurgery.editing.registry import Attachment, register_method

register_method(
    "reft",
    ReftConfig,
    run,
    Attachment(artifacts=(CONFIG_ARTIFACT, TENSORS_ARTIFACT), attach=attach_interventions),
)

__all__ = [
    "CONFIG_ARTIFACT",
    "TENSORS_ARTIFACT",
    "Example",
    "InterventionHandle",
    "ReftConfig",
    "attach_from_folder",
    "attach_interventions",
    "run",
]
