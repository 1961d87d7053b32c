"""ROME (rank-one model editing); importing this module registers the method ``rome``."""

from modelsurgery.editing.registry import register_method

from .config import RomeConfig
from .method import rank_one_update, run

register_method("rome", RomeConfig, run)

__all__ = ["RomeConfig", "rank_one_update", "run"]
