"""Inference-Time Intervention (Li et al. 2023) as the ``iti`` surgery method (registered on
import): per-head linear probes on true/false contrast texts choose the heads that separate
them best; each chosen head is shifted along its true-minus-false direction, baked into the
attention output projection's bias (plain weights: an exported version loads with
``from_pretrained``). The config is torch-free; ``method`` and ``records`` (multiple-choice
scoring, TruthfulQA's CSV) are imported on first use."""

from modelsurgery.editing.iti.config import ItiConfig, QARecord
from modelsurgery.editing.registry import Implementation, register_method


def _implementation() -> Implementation:
    from modelsurgery.editing.iti.method import run

    return Implementation(run)


register_method("iti", ItiConfig, _implementation)

__all__ = ["ItiConfig", "QARecord"]
