"""Contrastive activation addition as the ``steer`` surgery method.

A baked steer version is plain weights (MLP output biases). A hook-mode one (``bake: false``,
``positions: generated``, families without that bias) stores its vectors as artifacts that
attach through the registry's seam; it is a leaf: a later weight edit would move the
activations the vectors were fitted to, so nothing builds on it.

The config is torch-free (registered on import); the rest is imported on first use.
"""

from modelsurgery.editing.lazy import lazy_exports
from modelsurgery.editing.registry import Attachment, Implementation, register_method
from modelsurgery.editing.steer.config import SteerConfig

LOADING = (
    "The steering vectors (`steer/config.json`, `steer/vectors.safetensors`) are added to the "
    "residual stream by hooks: plain `AutoModelForCausalLM.from_pretrained(folder)` loads the "
    "unsteered base model. Load the folder with `modelsurgery.models.load(folder)`, which "
    "attaches them. For plain weights instead, run `steer` with `positions: all` on a family "
    "whose MLP output projection can carry a bias (Llama, GPT-2, ...): the vectors are then "
    "baked into it."
)


def _implementation() -> Implementation:
    from modelsurgery.editing.steer.artifacts import (
        CONFIG_ARTIFACT,
        VECTORS_ARTIFACT,
        attach_steering,
    )
    from modelsurgery.editing.steer.method import run

    attachment = Attachment(
        artifacts=(CONFIG_ARTIFACT, VECTORS_ARTIFACT), attach=attach_steering, loading=LOADING
    )
    return Implementation(run, attachment)


register_method("steer", SteerConfig, _implementation)

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        ".artifacts": ("CONFIG_ARTIFACT", "VECTORS_ARTIFACT"),
        ".vectors": ("SteeringVectors",),
    },
)

__all__ = [
    "CONFIG_ARTIFACT",
    "LOADING",
    "VECTORS_ARTIFACT",
    "SteerConfig",
    "SteeringVectors",
]
