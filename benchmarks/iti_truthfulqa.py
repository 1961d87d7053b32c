"""ITI (Inference-Time Intervention) on SmolLM2-135M-Instruct: TruthfulQA MC1, base vs ITI vs
the same number of random heads shifted by the same alpha.

The 408 TruthfulQA dev questions are split (seeded) into a fit half and a disjoint report
half. The fit half is split again: probes are fitted on the true/false answers of its
fit-train part (``"Q: {question}\\nA: {answer}"``, every correct vs every incorrect answer;
20% of those questions held out for ranking the heads), and ``top_k`` x ``alpha`` are tuned
on MC1 of its fit-dev part: the best fit-dev MC1 among settings whose WikiText-2 perplexity
ratio (first ``--grid-ppl-tokens`` tokens) stays within ``--max-ppl-ratio``. The report half
is touched only by the final rows: MC1 (best answer vs each incorrect one, sum of answer-token
log-probabilities after ``"Q: {question}\\nA:"``) and WikiText-2 perplexity (first
``--ppl-tokens`` tokens) for the base model, ITI with the tuned setting and random-head
controls (the same k, alpha and mass-mean-shift directions and sigmas, on heads drawn at
random, one row per seed). Every edit goes through the ``iti`` method's own functions
(``load_contrast``, ``collect_heads``, ``fit_heads``, ``shifts_for``, ``bake_head_shifts``:
what its ``run`` does), so the probes are fitted once for all rows.

    .venv/bin/python benchmarks/iti_truthfulqa.py

Cost: about 25 minutes on one busy CPU thread (head activations of 1,139 texts, 9 grid
cells of MC1 over 61 questions, 5 report rows of MC1 over 204).
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from modelsurgery.editing.data import shared_data_path
from modelsurgery.editing.data import split_indices as split
from modelsurgery.editing.iti.config import ItiConfig
from modelsurgery.editing.iti.method import (
    bake_head_shifts,
    collect_heads,
    fit_heads,
    load_contrast,
    shifts_for,
)
from modelsurgery.editing.iti.probes import rank_heads
from modelsurgery.editing.iti.records import QARecord, mc_correct, read_truthfulqa_csv
from modelsurgery.editing.mask_heads import format_head
from modelsurgery.editing.registry import MethodContext
from modelsurgery.evaluation.perplexity import wikitext_perplexity
from modelsurgery.models import load
from modelsurgery.models.adapters import get_adapter
from modelsurgery.models.hardware import describe


def shifted(model: torch.nn.Module, shifts: dict) -> torch.nn.Module:
    edited = copy.deepcopy(model)
    bake_head_shifts(edited, shifts)
    return edited


def mc1(model: torch.nn.Module, tokenizer: object, records: Sequence[QARecord]) -> list[bool]:
    return mc_correct(model, tokenizer, records, batch_size=16)


def perplexity(model: torch.nn.Module, tokenizer: object, tokens: int) -> float:
    return wikitext_perplexity(model, tokenizer, max_tokens=tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--fit-dev-fraction", type=float, default=0.3)
    parser.add_argument("--top-k", type=int, nargs="+", default=[4, 16, 32])
    parser.add_argument("--alpha", type=float, nargs="+", default=[1.0, 2.0, 5.0])
    parser.add_argument("--max-ppl-ratio", type=float, default=1.2)
    parser.add_argument("--grid-ppl-tokens", type=int, default=1024)
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--random-seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(describe(), flush=True)
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()

    loaded = load("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    rows = read_truthfulqa_csv(shared_data_path("truthfulqa/TruthfulQA-dev.csv"))
    fit_half, report_half = split(len(rows), 0.5, args.split_seed)
    fit_train_at, fit_dev_at = split(len(fit_half), args.fit_dev_fraction, args.split_seed)
    fit_records = [rows[fit_half[i]].fit_record() for i in fit_train_at]
    dev = [rows[fit_half[i]].mc1_record() for i in fit_dev_at]
    report = [rows[i].mc1_record() for i in report_half]
    chance = sum(1 / (1 + len(r.false)) for r in report) / len(report)
    print(
        f"questions: {len(rows)} = fit {len(fit_half)} (probes {len(fit_records)}, "
        f"tuning {len(dev)}) + report {len(report)}; report MC1 chance {chance:.3f}",
        flush=True,
    )

    # Probes once on the fit-train answers, with the method's own split and code.
    config = ItiConfig(records=fit_records, evaluate_perplexity=False)
    context = MethodContext(model_digest=loaded.digest, cache_dir=Path("/tmp/iti-cache"))
    contrast = load_contrast(config, context)
    adapter = get_adapter(model)
    num_heads = adapter.num_heads
    layers = list(range(adapter.num_layers))
    activations = collect_heads(model, tokenizer, contrast.texts, layers, config, context)
    fit = fit_heads(activations, contrast, config.direction)
    ranking = rank_heads(fit.probes)
    true_share = float(contrast.labels[contrast.held].float().mean())
    accuracy = fit.probes.accuracy
    print(
        f"probes: {len(contrast.fit)} fit texts, {len(contrast.held)} held-out texts "
        f"({len(contrast.held_records)} questions); held-out accuracy over "
        f"{len(ranking)} heads: mean {float(accuracy.mean()):.3f}, "
        f"max {float(accuracy.max()):.3f}; majority class "
        f"{max(true_share, 1 - true_share):.3f}",
        flush=True,
    )
    best = ", ".join(
        f"{format_head(i // num_heads, i % num_heads)}={float(accuracy[i]):.3f}"
        for i in ranking[:10]
    )
    print(f"top heads (layer.head=accuracy): {best}  [{time.perf_counter() - t0:.0f}s]")

    # Tuning grid on fit-dev.
    base_dev = sum(mc1(model, tokenizer, dev)) / len(dev)
    base_grid_ppl = perplexity(model, tokenizer, args.grid_ppl_tokens)
    print(
        f"\nTuning grid: fit-dev MC1 ({len(dev)} questions; base {base_dev:.3f}, one question "
        f"= {1 / len(dev):.3f}) / perplexity ratio on {args.grid_ppl_tokens} tokens"
    )
    print("top_k " + "".join(f"{f'alpha={a:g}':>16}" for a in args.alpha))
    grid: dict[tuple[int, float], tuple[float, float]] = {}
    for k in args.top_k:
        cells = []
        for alpha in args.alpha:
            edited = shifted(model, shifts_for(fit, ranking[:k], alpha, layers, num_heads))
            score = sum(mc1(edited, tokenizer, dev)) / len(dev)
            ratio = perplexity(edited, tokenizer, args.grid_ppl_tokens) / base_grid_ppl
            grid[k, alpha] = (score, ratio)
            cells.append(f"{score:.3f} / {ratio:.3f}".rjust(16))
            del edited
        print(f"{k:>5} " + "".join(cells), flush=True)
    allowed = [key for key, (_, ratio) in grid.items() if ratio <= args.max_ppl_ratio]
    if not allowed:
        raise SystemExit(f"no setting keeps the perplexity ratio within {args.max_ppl_ratio}")
    # Best fit-dev MC1; ties go to the smaller intervention (alpha, then k).
    top_k, alpha = max(allowed, key=lambda key: (grid[key][0], -key[1], -key[0]))
    print(
        f"chosen: top_k={top_k}, alpha={alpha:g} (fit-dev MC1 {grid[top_k, alpha][0]:.3f}, "
        f"perplexity ratio <= {args.max_ppl_ratio})  [{time.perf_counter() - t0:.0f}s]",
        flush=True,
    )

    # Report half: base, ITI, random-head controls.
    results: list[tuple[str, list[bool], float]] = []
    base_correct = mc1(model, tokenizer, report)
    base_ppl = perplexity(model, tokenizer, args.ppl_tokens)
    results.append(("base", base_correct, base_ppl))

    iti = shifted(model, shifts_for(fit, ranking[:top_k], alpha, layers, num_heads))
    chosen_accuracy = float(accuracy[ranking[:top_k]].mean())
    results.append(
        (
            f"ITI k={top_k} alpha={alpha:g}",
            mc1(iti, tokenizer, report),
            perplexity(iti, tokenizer, args.ppl_tokens),
        )
    )
    del iti
    print(f"ITI done (probe accuracy of its heads {chosen_accuracy:.3f})", flush=True)
    for seed in range(args.random_seeds):
        heads = random.Random(seed).sample(range(len(ranking)), top_k)
        edited = shifted(model, shifts_for(fit, heads, alpha, layers, num_heads))
        results.append(
            (
                f"random k={top_k} seed {seed}",
                mc1(edited, tokenizer, report),
                perplexity(edited, tokenizer, args.ppl_tokens),
            )
        )
        del edited
        print(f"random seed {seed} done  [{time.perf_counter() - t0:.0f}s]", flush=True)

    n = len(report)
    print(
        f"\nReport half: {n} questions, MC1 standard error ~ "
        f"{math.sqrt(chance * (1 - chance) / n):.3f} at chance; perplexity: WikiText-2 test, "
        f"first {args.ppl_tokens} tokens"
    )
    print(f"{'variant':<26}{'MC1':>7}{'vs base':>9}{'gained':>8}{'lost':>6}{'ppl':>9}{'ratio':>8}")
    for name, correct, ppl in results:
        score = sum(correct) / n
        gained = sum(c and not b for c, b in zip(correct, base_correct, strict=True))
        lost = sum(b and not c for c, b in zip(correct, base_correct, strict=True))
        print(
            f"{name:<26}{score:>7.3f}{score - sum(base_correct) / n:>+9.3f}{gained:>8}{lost:>6}"
            f"{ppl:>9.3f}{ppl / base_ppl:>8.3f}"
        )
    print(f"[{time.perf_counter() - t0:.0f}s]")


if __name__ == "__main__":
    main()
