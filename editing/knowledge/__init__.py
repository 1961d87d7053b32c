"""Shared pieces of the knowledge editors (ROME, MEMIT): facts, templates, token bookkeeping,
prefix-cached forward passes, v* optimisation, second-moment statistics, CounterFact metrics.
The facts and config are torch-free (the client validates specs with them); the torch parts
(``stats``, ``vstar``, ``evaluate`` ...) are imported from their modules when used."""

from modelsurgery.editing.lazy import lazy_exports

from .config import FAMILY_DEFAULTS, FamilyDefaults, KnowledgeEditConfig
from .facts import Fact

__getattr__, __dir__ = lazy_exports(__name__, {".stats": ("StatsSettings", "second_moments")})

__all__ = [
    "FAMILY_DEFAULTS",
    "Fact",
    "FamilyDefaults",
    "KnowledgeEditConfig",
    "StatsSettings",
    "second_moments",
]
