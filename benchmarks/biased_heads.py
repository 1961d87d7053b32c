"""Biased-head masking on SmolLM2-135M vs masking random heads (the control of Yang et al. 2023).

Scores every head on one seeded half of the CrowS-Pairs pairs of one bias type, masks the top-k
chosen by each strategy, and measures the stereotype share / mean log-likelihood gap on the
other half and WikiText-2 perplexity; then does the same for k random heads over several seeds.
Strategies: ``gradient-gap`` (first-order score of the raw mean gap, the original method),
``gradient-share`` (first-order score of the smooth stereotype share) and ``shortlist-P``
(the ``--shortlist`` best gradient-share heads re-ranked by exact ablation on the scoring split,
minus P x the LM loss their removal adds on WikiText-2 *validation* windows). Prints a table.

    .venv/bin/python benchmarks/biased_heads.py --k 3 5 --random-seeds 3 --ppl-tokens 2048

Cost: 2 gradient passes, --shortlist ablations and one held-out + perplexity evaluation per row
(about an hour on two busy CPU cores; ``--skip gradient-gap shortlist-0`` saves four rows).
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch

from modelsurgery.editing.bias.scoring import ablation_scores, gradient_scores, select_heads
from modelsurgery.editing.data import calibration_windows
from modelsurgery.editing.mask_heads import format_head, mask_heads_in_place
from modelsurgery.editing.stereotypes.metrics import (
    BiasObjective,
    TokenizedPair,
    bias_metrics,
    tokenize_pairs,
)
from modelsurgery.editing.stereotypes.pairs import load_crows_pairs, split_pairs
from modelsurgery.evaluation.perplexity import wikitext_perplexity
from modelsurgery.models import load
from modelsurgery.models.hardware import describe


def evaluate(
    model: torch.nn.Module,
    tokenizer: object,
    heads: list[tuple[int, int]],
    holdout: list[TokenizedPair],
    ppl_tokens: int,
) -> dict[str, float]:
    """Bias on held-out pairs and perplexity of a copy of ``model`` with ``heads`` masked."""
    edited = copy.deepcopy(model)
    mask_heads_in_place(edited, heads)
    out = bias_metrics(edited, holdout)
    out["perplexity"] = wikitext_perplexity(edited, tokenizer, max_tokens=ppl_tokens)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bias-type", default="gender")
    parser.add_argument("--k", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--holdout-fraction", type=float, default=0.5)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--ppl-tokens", type=int, default=2048)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--shortlist", type=int, default=16)
    parser.add_argument("--penalties", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--calibration-windows", type=int, default=8)
    parser.add_argument("--skip", nargs="*", default=[], help="strategies not to evaluate")
    args = parser.parse_args()
    print(describe(), flush=True)
    torch.set_grad_enabled(False)

    t0 = time.perf_counter()
    loaded = load("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    pairs = load_crows_pairs(bias_types=[args.bias_type])
    scoring, holdout = split_pairs(pairs, args.holdout_fraction, args.split_seed)
    scoring_ids, holdout_ids = (
        tokenize_pairs(tokenizer, scoring),
        tokenize_pairs(tokenizer, holdout),
    )
    print(
        f"SmolLM2-135M loaded in {time.perf_counter() - t0:.1f}s; {args.bias_type} pairs: "
        f"{len(scoring)} scoring, {len(holdout)} held out (split seed {args.split_seed})",
        flush=True,
    )

    share = BiasObjective("share", args.temperature)
    strategies: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    gaps, strategies["gradient-gap"] = gradient_scores(model, scoring_ids, BiasObjective("gap"))
    _, strategies["gradient-share"] = gradient_scores(model, scoring_ids, share)
    print(
        f"gradient scores (2 objectives): {time.perf_counter() - t0:.1f}s; scoring split: "
        f"mean gap {float(gaps.mean()):.4f}, median gap {float(gaps.median()):.4f}, "
        f"smooth share {share.value(gaps):.4f}",
        flush=True,
    )
    shortlist = select_heads(strategies["gradient-share"], top_k=args.shortlist)
    calibration = calibration_windows(tokenizer, args.calibration_windows, 128, seed=0)
    t0 = time.perf_counter()
    drop, added = ablation_scores(
        model, scoring_ids, shortlist, share, base_gaps=gaps, calibration=calibration
    )
    assert added is not None
    print(f"shortlist ablation of {len(shortlist)} heads: {time.perf_counter() - t0:.1f}s")
    print("  head   grad-share  share-drop  loss-added")
    for h in shortlist:
        print(
            f"  {format_head(*h):<6}{float(strategies['gradient-share'][h]):>11.4f}"
            f"{float(drop[h]):>12.4f}{float(added[h]):>12.4f}"
        )
    for penalty in args.penalties:
        strategies[f"shortlist-{penalty:g}"] = drop - penalty * added
    layers, heads = drop.shape
    for name in args.skip:
        strategies.pop(name)

    base = evaluate(model, tokenizer, [], holdout_ids, args.ppl_tokens)
    header = f"{'heads masked':<40}{'stereo share':>13}{'bias gap':>10}{'ppl':>9}{'ppl ratio':>10}"
    print(header)
    print("-" * len(header), flush=True)

    def row(label: str, m: dict[str, float]) -> None:
        ratio = m["perplexity"] / base["perplexity"]
        print(
            f"{label:<40}{m['stereotype_share']:>13.4f}{m['bias_gap']:>10.4f}"
            f"{m['perplexity']:>9.3f}{ratio:>10.4f}",
            flush=True,
        )

    row("none (baseline)", base)
    all_heads = [(layer, head) for layer in range(layers) for head in range(heads)]
    for k in args.k:
        for name, table in strategies.items():
            chosen = select_heads(table, top_k=k)
            label = f"{name} top-{k} " + ",".join(format_head(*h) for h in chosen)
            row(label, evaluate(model, tokenizer, chosen, holdout_ids, args.ppl_tokens))
        runs = [
            evaluate(
                model,
                tokenizer,
                random.Random(seed).sample(all_heads, k),
                holdout_ids,
                args.ppl_tokens,
            )
            for seed in range(args.random_seeds)
        ]
        mean = {key: statistics.fmean(r[key] for r in runs) for key in runs[0]}
        row(f"random-{k} (mean of {args.random_seeds})", mean)
        shares = [r["stereotype_share"] for r in runs]
        print(f"{'':<40}random-{k} stereo share min {min(shares):.4f} max {max(shares):.4f}")


if __name__ == "__main__":
    main()
