"""MEMIT (mass-editing memory); importing this module registers the method ``memit``."""

from modelsurgery.editing.registry import register_method

from .config import MemitConfig
from .method import memit_update, run

register_method("memit", MemitConfig, run)

__all__ = ["MemitConfig", "memit_update", "run"]
