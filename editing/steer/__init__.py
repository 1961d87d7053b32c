"""Contrastive activation addition as the ``steer`` surgery method.

A baked steer version is plain weights (MLP output biases). A hook-mode one (``bake: false``,
``positions: generated``, families without that bias) stores its vectors as artifacts that
attach through the registry's seam; it is a leaf: a later weight edit would move the
activations the vectors were fitted to, so nothing builds on it.
"""

from modelsurgery.editing.registry import Attachment, register_method
from modelsurgery.editing.steer.artifacts import (
    CONFIG_ARTIFACT,
    VECTORS_ARTIFACT,
    attach_steering,
)
from modelsurgery.editing.steer.config import SteerConfig
from modelsurgery.editing.steer.method import run
from modelsurgery.editing.steer.vectors import SteeringVectors

register_method(
    "steer",
    SteerConfig,
    run,
    Attachment(artifacts=(CONFIG_ARTIFACT, VECTORS_ARTIFACT), attach=attach_steering),
)

__all__ = [
    "CONFIG_ARTIFACT",
    "VECTORS_ARTIFACT",
    "SteerConfig",
    "SteeringVectors",
    "attach_steering",
    "run",
]
