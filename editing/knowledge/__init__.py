"""Shared pieces of the knowledge editors (ROME, MEMIT): facts, templates, token bookkeeping,
prefix-cached forward passes, v* optimisation, second-moment statistics, CounterFact metrics."""

from .config import FAMILY_DEFAULTS, FamilyDefaults, KnowledgeEditConfig
from .evaluate import EditEvaluation, edit_metrics, score_facts
from .facts import Fact
from .stats import StatsSettings, second_moments
from .vstar import VStarParams, VStarResult, optimize_deltas

__all__ = [
    "FAMILY_DEFAULTS",
    "EditEvaluation",
    "Fact",
    "FamilyDefaults",
    "KnowledgeEditConfig",
    "StatsSettings",
    "VStarParams",
    "VStarResult",
    "edit_metrics",
    "optimize_deltas",
    "score_facts",
    "second_moments",
]
