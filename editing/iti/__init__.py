"""Inference-Time Intervention (Li et al. 2023) as the ``iti`` surgery method: per-head
linear probes on true/false contrast texts choose the heads that separate them best; each
chosen head is shifted along its true-minus-false direction, baked into the attention output
projection's bias (plain weights: an exported version loads with ``from_pretrained``)."""

from modelsurgery.editing.iti.config import ItiConfig
from modelsurgery.editing.iti.method import bake_head_shifts, run
from modelsurgery.editing.iti.records import QARecord, mc_accuracy, read_truthfulqa_csv
from modelsurgery.editing.registry import register_method

register_method("iti", ItiConfig, run)

__all__ = [
    "ItiConfig",
    "QARecord",
    "bake_head_shifts",
    "mc_accuracy",
    "read_truthfulqa_csv",
    "run",
]
