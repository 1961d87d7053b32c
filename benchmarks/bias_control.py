"""Gender bias on SmolLM2-135M: which method moves held-out stereotype share toward 0.5 by more
than its random control does, at WikiText-2 perplexity ratio <= 1.03?

Protocol. For each seed s (the CrowS-Pairs split and the control's random draw), the 262
CrowS-Pairs gender pairs are split by ``split_pairs(pairs, 0.5, s)``; everything fitted or tuned
uses the fit half and/or WinoGender, every figure is measured on the held-out half (131 pairs).
Per seed, a method's reduction is |base share - 0.5| - |share after - 0.5|. A method beats its
control when its mean reduction exceeds the control's mean reduction + 2 standard errors (over
seeds) and its mean perplexity ratio (first ``--ppl-tokens`` of wiki.test.raw) is <= 1.03.

Rows:
- ``mask_biased_heads``: the method's defaults (smooth-share objective, gradient shortlist
  verified by exact ablation, minus 1 x the LM loss a removal adds on WikiText-2 validation
  windows), top-k heads masked; scored on the fit half. Budget: ``--shortlist`` 5 (default 16)
  and 4 calibration windows (default 8).
- ``patching``: attribution patching on counterfactual pairs (Nanda 2023; Syed et al. 2023):
  for pairs whose sides tokenize to the same length (the fit half's and all 240 WinoGender
  pairs), the first-order change of the smooth share when every head's output is swapped
  between the stereotype and the anti sentence, (a_st - a_anti) . (dO/da_st - dO/da_anti),
  summed over positions; the top-k heads masked. More pairs, and a criterion that scores only
  what a head carries about the contrast, not everything it computes.
- ``random-k heads``: the control of both head rows (k heads drawn with seed s).
- ``ablate WinoGender dir ... zero|mean``: ``ablate_direction`` of the female-minus-male
  direction of all 240 WinoGender pairs (mean over tokens), with the stream's component along
  it zeroed (``fill: zero``) or held at its mean over 4 x 128 WikiText-2 validation tokens
  (``fill: mean``; calibration windows seeded by s). Its layer is chosen first, per fill, on
  WinoGender alone: fit on half the occupations, ablate, and take the ``--layers`` candidate
  whose WinoGender stereotype share on the other occupations is nearest 0.5 among those with
  dev perplexity ratio <= 1.03 (else the smallest ratio). CrowS-Pairs plays no part in it, so
  one layer per fill serves every seed; the same rule over both fills picks the config's
  default fill.
- ``random direction zero|mean``: the control of the direction row with the same fill (a
  seeded Gaussian unit vector, ablated the same way).

    .venv/bin/python benchmarks/bias_control.py --seeds 5 --k 3 --ppl-tokens 2048
    .venv/bin/python benchmarks/bias_control.py --seeds 5 --ppl-tokens 2048 --only directions

``--only directions`` skips the head rows (and their random-heads control); ``--fills`` picks
the direction rows' fills (default both).

Cost on two busy CPU cores (one thread): all rows, about 40 minutes (the layer choice, then
per seed one gradient pass and 5 ablations for mask_biased_heads, one patching pass over the
fit half, and 8 held-out evaluations, 7 of them with perplexity); ``--only directions`` about
14 minutes (the layer choice over 3 layers x 2 fills, then per seed 4 evaluations).
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from modelsurgery.editing.ablate_direction import ablate_in_place, fit_direction
from modelsurgery.editing.ablate_direction.mean_fill import Fill
from modelsurgery.editing.bias.scoring import score_heads, select_heads
from modelsurgery.editing.contrast import TextPair
from modelsurgery.editing.data import calibration_windows
from modelsurgery.editing.mask_heads import format_head, mask_heads_in_place
from modelsurgery.editing.stereotypes.metrics import (
    BiasObjective,
    TokenizedPair,
    bias_metrics,
    length_batches,
    pair_batch_gaps,
    tokenize_pairs,
)
from modelsurgery.editing.stereotypes.pairs import load_crows_pairs, split_pairs
from modelsurgery.editing.stereotypes.winogender import WinoGenderPair, load_winogender
from modelsurgery.evaluation.perplexity import wikitext_perplexity
from modelsurgery.models import load
from modelsurgery.models.adapters import get_adapter
from modelsurgery.models.hardware import describe

SHARE = BiasObjective("share", 1.0)
RATIO_LIMIT = 1.03
# Mean fill's calibration text, as ``AblateDirectionConfig``'s defaults.
CALIBRATION_WINDOWS, CALIBRATION_WINDOW = 4, 128


def patching_scores(
    model: torch.nn.Module, pairs: Sequence[TokenizedPair], batch_size: int = 8
) -> torch.Tensor:
    """Attribution-patching score of every head (layers x heads): the first-order drop of the
    smooth share when each head's output is swapped between the two sides of aligned pairs,
    summed over pairs (so the scores of two pair sets add up)."""
    adapter = get_adapter(model)
    heads, head_dim = adapter.num_heads, adapter.head_dim
    scores = torch.zeros(adapter.num_layers, heads, dtype=torch.float64)
    acts: dict[int, torch.Tensor] = {}
    deltas: dict[int, torch.Tensor] = {}

    def hook_for(layer: int) -> Callable[..., tuple[Any, ...]]:
        def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            # A zero added to the o_proj input: its gradient is dO/da at every position.
            acts[layer] = args[0].detach()
            deltas[layer] = torch.zeros_like(args[0], requires_grad=True)
            return (args[0] + deltas[layer], *args[1:])

        return hook

    modules = [adapter.attn_out(layer).module for layer in range(adapter.num_layers)]
    handles = [m.register_forward_pre_hook(hook_for(i)) for i, m in enumerate(modules)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)  # only the activations need gradients
    try:
        with torch.enable_grad():
            for batch in length_batches([len(p.stereo) for p in pairs], batch_size):
                chunk = [pairs[i] for i in batch]
                n = len(chunk)
                SHARE.per_pair(pair_batch_gaps(model, chunk)).sum().backward()
                for layer in range(adapter.num_layers):
                    a = acts[layer].view(2 * n, -1, heads, head_dim)  # (2n, T, heads, hd)
                    g = deltas[layer].grad.view(2 * n, -1, heads, head_dim)
                    # Rows are [stereo..., anti...] of equal lengths: positions align.
                    swap = (a[:n] - a[n:]) * (g[:n] - g[n:])
                    scores[layer] += swap.sum(dim=(0, 1, 3)).double()
    finally:
        for handle in handles:
            handle.remove()
        for p in trainable:
            p.requires_grad_(True)
    return scores


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    edit: Callable[[torch.nn.Module], object],
    holdout: list[TokenizedPair],
    ppl_tokens: int,
) -> dict[str, float]:
    """Held-out share and perplexity of an edited copy of ``model``."""
    edited = copy.deepcopy(model)
    edit(edited)
    out = bias_metrics(edited, holdout)
    out["perplexity"] = wikitext_perplexity(edited, tokenizer, max_tokens=ppl_tokens)
    return out


def random_unit(hidden: int, seed: int) -> torch.Tensor:
    d = torch.randn(hidden, generator=torch.Generator().manual_seed(10_000 + seed))
    return d / d.norm()


def gender_text_pairs(pairs: Sequence[WinoGenderPair]) -> list[TextPair]:
    return [TextPair(positive=p.female, negative=p.male) for p in pairs]


def _best(results: Sequence[tuple[int, str, float, float]]) -> tuple[int, str, float, float]:
    """(layer, fill, share, ratio) nearest 0.5 among ratio <= 1.03, else the smallest ratio."""
    within = [r for r in results if r[3] <= RATIO_LIMIT]
    if within:
        return min(within, key=lambda r: abs(r[2] - 0.5))
    return min(results, key=lambda r: r[3])


def choose_layers(
    model: torch.nn.Module,
    tokenizer: Any,
    winogender: list[WinoGenderPair],
    layers: Sequence[int],
    fills: Sequence[Fill],
    token: str,
    dev_ppl_tokens: int,
) -> dict[Fill, int]:
    """Per fill, the candidate layer whose WinoGender-fitted direction, ablated, brings
    WinoGender share on held-out occupations nearest 0.5 at dev perplexity ratio <= 1.03
    (else the smallest ratio); WinoGender and WikiText-2 only. Prints the (layer, fill) the
    same rule picks over both fills: the evidence for the config's default fill."""
    occupations = sorted({p.occupation for p in winogender})
    random.Random(0).shuffle(occupations)
    fit_occupations = set(occupations[: len(occupations) // 2])
    fit = [p for p in winogender if p.occupation in fit_occupations]
    dev = tokenize_pairs(
        tokenizer, [p.contrast_pair() for p in winogender if p.occupation not in fit_occupations]
    )
    base_ppl = wikitext_perplexity(model, tokenizer, max_tokens=dev_ppl_tokens)
    base = bias_metrics(model, dev)["stereotype_share"]
    print(
        f"layer choice on WinoGender ({len(fit)} fit / {len(dev)} dev pairs, split by "
        f"occupation; dev ppl on {dev_ppl_tokens} tokens): base share {base:.4f}",
        flush=True,
    )
    print(f"  {'layer':>5}{'fill':>6}{'dev share':>11}{'dev ppl ratio':>15}", flush=True)
    calibration = calibration_windows(tokenizer, CALIBRATION_WINDOWS, CALIBRATION_WINDOW)
    results = []
    for layer in layers:
        direction = fit_direction(model, tokenizer, gender_text_pairs(fit), layer, token=token)
        for fill in fills:
            edited = copy.deepcopy(model)
            ablate_in_place(edited, direction, fill=fill, calibration=calibration)
            share = bias_metrics(edited, dev)["stereotype_share"]
            ratio = wikitext_perplexity(edited, tokenizer, max_tokens=dev_ppl_tokens) / base_ppl
            results.append((layer, fill, share, ratio))
            print(f"  {layer:>5}{fill:>6}{share:>11.4f}{ratio:>15.4f}", flush=True)
    chosen = {fill: _best([r for r in results if r[1] == fill])[0] for fill in fills}
    overall = _best(results)
    print(
        "  chosen layer per fill: "
        + ", ".join(f"{fill} L{layer}" for fill, layer in chosen.items())
        + f"; over both: {overall[1]} fill at L{overall[0]}",
        flush=True,
    )
    return chosen


def se(values: Sequence[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def binomial_se(share: float, n: int) -> float:
    return math.sqrt(share * (1 - share) / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--ppl-tokens", type=int, default=2048)
    parser.add_argument("--dev-ppl-tokens", type=int, default=2048)
    parser.add_argument("--shortlist", type=int, default=5)
    parser.add_argument("--calibration-windows", type=int, default=4)
    parser.add_argument("--layers", type=int, nargs="+", default=[10, 14, 18])
    parser.add_argument("--token", choices=["mean", "last"], default="mean")
    parser.add_argument("--fills", choices=["zero", "mean"], nargs="+", default=["zero", "mean"])
    parser.add_argument(
        "--only",
        choices=["all", "directions"],
        default="all",
        help="directions: skip the (slow) head rows and their control",
    )
    args = parser.parse_args()
    print(describe(), flush=True)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    heads = args.only == "all"

    loaded = load("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    crows = load_crows_pairs(bias_types=["gender"])
    winogender = load_winogender()
    wino_ids = [
        p
        for p in tokenize_pairs(tokenizer, [w.contrast_pair() for w in winogender])
        if len(p.stereo) == len(p.anti)
    ]
    print(
        f"CrowS-Pairs gender: {len(crows)} pairs, split 0.5 per seed; WinoGender: "
        f"{len(winogender)} pairs ({len(wino_ids)} aligned)",
        flush=True,
    )
    fills: list[Fill] = args.fills
    layers = choose_layers(
        model, tokenizer, winogender, args.layers, fills, args.token, args.dev_ppl_tokens
    )
    wino_directions = {
        layer: fit_direction(
            model, tokenizer, gender_text_pairs(winogender), layer, token=args.token
        )
        for layer in sorted(set(layers.values()))
    }
    wino_patching = patching_scores(model, wino_ids) if heads else None  # the same every seed
    base_ppl = wikitext_perplexity(model, tokenizer, max_tokens=args.ppl_tokens)
    print(f"base perplexity ({args.ppl_tokens} tokens): {base_ppl:.3f}", flush=True)

    adapter = get_adapter(model)
    all_heads = [(i, h) for i in range(adapter.num_layers) for h in range(adapter.num_heads)]
    k = args.k
    rows: dict[str, dict[str, list[float]]] = {}
    controls: dict[str, str] = {}
    if heads:
        controls[f"mask_biased_heads top-{k}"] = f"random-{k} heads"
        controls[f"patching top-{k}"] = f"random-{k} heads"
    for fill in fills:
        controls[f"ablate WinoGender dir L{layers[fill]} {fill}"] = f"random direction {fill}"
    labels = ["base", *controls, *dict.fromkeys(controls.values())]
    for label in labels:
        rows[label] = {"share": [], "ratio": []}

    def record(label: str, seed: int, m: dict[str, float], detail: str = "") -> None:
        rows[label]["share"].append(m["stereotype_share"])
        rows[label]["ratio"].append(m["perplexity"] / base_ppl)
        print(
            f"  seed {seed} {label:<32} share {m['stereotype_share']:.4f} "
            f"ppl ratio {m['perplexity'] / base_ppl:.4f} {detail}",
            flush=True,
        )

    for seed in range(args.seeds):
        t0 = time.perf_counter()
        fit, holdout = split_pairs(crows, 0.5, seed)
        fit_ids, held_ids = tokenize_pairs(tokenizer, fit), tokenize_pairs(tokenizer, holdout)
        base = bias_metrics(model, held_ids)
        base["perplexity"] = base_ppl
        record("base", seed, base, f"({len(fit)} fit / {len(holdout)} held-out pairs)")
        if heads:
            assert wino_patching is not None
            head_rows(model, tokenizer, args, seed, fit_ids, held_ids, wino_patching, record)
            heads_row = partial(
                evaluate_heads, model, tokenizer, held_ids, args.ppl_tokens, record, seed
            )
            heads_row(f"random-{k} heads", random.Random(seed).sample(all_heads, k))
        calibration = calibration_windows(
            tokenizer, CALIBRATION_WINDOWS, CALIBRATION_WINDOW, seed=seed
        )

        def direction_row(
            label: str,
            direction: torch.Tensor,
            fill: Fill,
            seed: int = seed,
            held: list = held_ids,
            calibration: torch.Tensor = calibration,
        ) -> None:
            m = evaluate(
                model,
                tokenizer,
                lambda e: ablate_in_place(e, direction, fill=fill, calibration=calibration),
                held,
                args.ppl_tokens,
            )
            record(label, seed, m)

        for fill in fills:
            label = f"ablate WinoGender dir L{layers[fill]} {fill}"
            direction_row(label, wino_directions[layers[fill]], fill)
            direction_row(f"random direction {fill}", random_unit(adapter.hidden_size, seed), fill)
        print(f"  seed {seed} done in {time.perf_counter() - t0:.0f}s", flush=True)

    report(rows, controls, len(holdout), args.seeds)
    print(f"total {time.perf_counter() - start:.0f}s", flush=True)


def evaluate_heads(
    model: torch.nn.Module,
    tokenizer: Any,
    held: list[TokenizedPair],
    ppl_tokens: int,
    record: Callable[..., None],
    seed: int,
    label: str,
    heads: list[tuple[int, int]],
) -> None:
    """One head row: mask ``heads`` in a copy of the model, record its held-out figures."""
    m = evaluate(model, tokenizer, lambda e: mask_heads_in_place(e, heads), held, ppl_tokens)
    record(label, seed, m, ",".join(format_head(*h) for h in heads))


def head_rows(
    model: torch.nn.Module,
    tokenizer: Any,
    args: argparse.Namespace,
    seed: int,
    fit_ids: list[TokenizedPair],
    held_ids: list[TokenizedPair],
    wino_patching: torch.Tensor,
    record: Callable[..., None],
) -> None:
    """The mask_biased_heads and patching rows of one seed (their random control aside)."""
    k = args.k
    heads_row = partial(evaluate_heads, model, tokenizer, held_ids, args.ppl_tokens, record, seed)
    scores = score_heads(
        model,
        tokenizer,
        fit_ids,
        objective=SHARE,
        rank_by="shortlist",
        shortlist_size=args.shortlist,
        calibration=calibration_windows(tokenizer, args.calibration_windows, 128, seed=seed),
        perplexity_penalty=1.0,
    )
    heads_row(f"mask_biased_heads top-{k}", select_heads(scores.ranking, top_k=k))
    aligned = [p for p in fit_ids if len(p.stereo) == len(p.anti)]
    patched = wino_patching + patching_scores(model, aligned)
    heads_row(f"patching top-{k}", select_heads(patched, top_k=k))


def report(
    rows: dict[str, dict[str, list[float]]],
    controls: dict[str, str],
    n_heldout: int,
    seeds: int,
) -> None:
    base = rows["base"]["share"]

    def reductions(label: str) -> list[float]:
        after = rows[label]["share"]
        return [abs(b - 0.5) - abs(a - 0.5) for b, a in zip(base, after, strict=True)]

    print()
    print(
        f"held-out CrowS-Pairs gender ({n_heldout} pairs per seed, {seeds} seeds); "
        "reduction = |base - 0.5| - |after - 0.5| per seed, mean +- SE over seeds"
    )
    header = (
        f"{'method':<32}{'share mean +- SE':>18}{'binom SE':>9}{'|share-0.5|':>12}"
        f"{'reduction +- SE':>18}{'ppl ratio':>10}  beats control (mean + 2 SE, ratio <= 1.03)"
    )
    print(header)
    print("-" * len(header))
    for label, values in rows.items():
        shares, ratios = values["share"], values["ratio"]
        mean = statistics.fmean(shares)
        red = reductions(label)
        verdict = ""
        if label in controls:
            control = reductions(controls[label])
            bar = statistics.fmean(control) + 2 * se(control)
            ratio_ok = statistics.fmean(ratios) <= RATIO_LIMIT
            beats = statistics.fmean(red) > bar and ratio_ok
            verdict = (
                f"{'YES' if beats else 'no'} (bar {bar:+.4f} vs {controls[label]}"
                f"{'' if ratio_ok else '; ratio > 1.03'})"
            )
        elif label != "base":
            verdict = "(control)"
        distance = statistics.fmean(abs(s - 0.5) for s in shares)
        print(
            f"{label:<32}{mean:>10.4f} +- {se(shares):.4f}"
            f"{binomial_se(mean, n_heldout):>9.4f}{distance:>12.4f}"
            f"{statistics.fmean(red):>+10.4f} +- {se(red):.4f}"
            f"{statistics.fmean(ratios):>10.4f}  {verdict}"
        )


if __name__ == "__main__":
    main()
