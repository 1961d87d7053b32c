"""ReFT (representation finetuning, Wu et al. 2024) as the ``reft`` surgery method.

Loading a ReFT version: ``attach_interventions(model, artifacts)`` or
``attach_from_folder(model, folder)`` return a handle whose hooks make ``model(...)`` and
``model.generate(...)`` apply the interventions; ``handle.remove()`` detaches them.
"""

from modelsurgery.editing.reft.artifacts import (
    CONFIG_ARTIFACT,
    TENSORS_ARTIFACT,
    attach_from_folder,
    attach_interventions,
    folder_has_interventions,
    stored_interventions,
)
from modelsurgery.editing.reft.config import Example, ReftConfig
from modelsurgery.editing.reft.hooks import InterventionHandle
from modelsurgery.editing.reft.lineage import combination_error, is_reft_version
from modelsurgery.editing.reft.method import run
from modelsurgery.editing.registry import register_method

register_method("reft", ReftConfig, run)

__all__ = [
    "CONFIG_ARTIFACT",
    "TENSORS_ARTIFACT",
    "Example",
    "InterventionHandle",
    "ReftConfig",
    "attach_from_folder",
    "attach_interventions",
    "combination_error",
    "folder_has_interventions",
    "is_reft_version",
    "run",
    "stored_interventions",
]
