"""The ``mask_biased_heads`` method: score heads on one split of contrast pairs, mask the most
bias-driving heads, and measure bias and fluency before/after on pairs not used for scoring."""

from __future__ import annotations

import json
import random
from typing import Any

import torch

from modelsurgery.editing.bias.config import MaskBiasedHeadsConfig
from modelsurgery.editing.bias.scoring import score_heads, select_heads
from modelsurgery.editing.data import calibration_windows, resolve_data_file
from modelsurgery.editing.mask_heads import format_head, mask_heads_in_place
from modelsurgery.editing.registry import MethodContext, SurgeryResult
from modelsurgery.editing.stereotypes.metrics import BiasObjective, bias_metrics, tokenize_pairs
from modelsurgery.editing.stereotypes.pairs import (
    ContrastPair,
    load_crows_pairs,
    load_pairs_jsonl,
    split_pairs,
)
from modelsurgery.evaluation.metrics import PAIRS

CALIBRATION_WINDOW = 128


def load_pairs(config: MaskBiasedHeadsConfig, context: MethodContext) -> list[ContrastPair]:
    if config.pairs is not None:
        pairs = [ContrastPair(p.stereo, p.anti) for p in config.pairs]
    elif config.pairs_file is not None:
        path = resolve_data_file(config.pairs_file, context.data_roots, "pairs_file")
        pairs = load_pairs_jsonl(path)
    else:
        pairs = load_crows_pairs(bias_types=config.bias_types)
    if config.max_pairs is not None and len(pairs) > config.max_pairs:
        keep = sorted(random.Random(config.seed).sample(range(len(pairs)), config.max_pairs))
        pairs = [pairs[i] for i in keep]
    return pairs


def run(
    model: torch.nn.Module,
    tokenizer: Any,
    config: MaskBiasedHeadsConfig,
    context: MethodContext,
) -> SurgeryResult:
    pairs = load_pairs(config, context)
    scoring, holdout = split_pairs(pairs, config.holdout_fraction, config.seed)
    scoring_ids, holdout_ids = (
        tokenize_pairs(tokenizer, scoring),
        tokenize_pairs(tokenizer, holdout),
    )
    metrics: dict[str, float] = {
        "pairs_scored": float(len(scoring)),
        "pairs_heldout": float(len(holdout)),
    }

    context.progress("bias before masking")
    before = bias_metrics(model, holdout_ids, config.batch_size)

    def on_step(message: str, step: int, total: int) -> None:
        context.check_cancelled()
        context.progress(message, step=step, total=total)

    calibration = None
    if config.rank_by != "gradient" and config.perplexity_penalty > 0:
        context.progress("calibration text")
        calibration = calibration_windows(
            tokenizer, config.calibration_windows, CALIBRATION_WINDOW, seed=config.seed
        )
    scores = score_heads(
        model,
        tokenizer,
        scoring_ids,
        objective=BiasObjective(config.objective, config.share_temperature),
        rank_by=config.rank_by,
        shortlist_size=config.shortlist_size,
        calibration=calibration,
        perplexity_penalty=config.perplexity_penalty,
        batch_size=config.batch_size,
        on_step=on_step,
    )
    chosen = select_heads(scores.ranking, **config.selection())
    context.progress(f"masking heads {[format_head(*h) for h in chosen]}")
    changed = mask_heads_in_place(model, chosen)

    after = bias_metrics(model, holdout_ids, config.batch_size)
    for name in ("stereotype_share", "bias_gap"):
        metrics[f"{name}_before"] = before[name]
        metrics[f"{name}_after"] = after[name]
    metrics["heads_masked"] = float(len(chosen))
    table = scores.to_json_dict(chosen)
    return SurgeryResult(
        changed=changed,
        metrics=metrics,
        artifacts={"head_scores.json": json.dumps(table, indent=1).encode()},
        suite={PAIRS: [{"stereo": p.stereo, "anti": p.anti} for p in holdout]},
    )
