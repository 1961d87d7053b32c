"""``steer`` toward positive sentiment on SmolLM2-135M, judged by a lexicon the model never saw.

Fits the ``steer`` method on the 16 contrast pairs in ``benchmarks/data/sentiment_pairs.jsonl``,
then greedily continues neutral prompts (``benchmarks/data/neutral_prompts.json``: 20 ``dev``
prompts for choosing the defaults, 50 ``report`` prompts for the figures) by 30 tokens and
counts the continuations vaderSentiment scores compound > 0.05. Side by side in one run: the
base, the baked version (MLP output biases), the same vectors as hooks, and the baked version
exported by the store and loaded with plain ``AutoModelForCausalLM.from_pretrained`` (greedy
tokens compared with the hooked run), each with its WikiText-2 perplexity ratio.

    .venv/bin/python benchmarks/steer_sentiment.py                # report, config defaults
    .venv/bin/python benchmarks/steer_sentiment.py --tune         # the grid, on dev prompts
    .venv/bin/python benchmarks/steer_sentiment.py --layer 6,7,8 --coefficient 2
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.editing.attachments import attach_hooks
from modelsurgery.editing.registry import MethodContext, get_method
from modelsurgery.editing.steer import SteerConfig
from modelsurgery.editing.steer.config import DEFAULT_COEFFICIENT
from modelsurgery.evaluation.perplexity import wikitext_perplexity
from modelsurgery.models import load
from modelsurgery.models.hardware import describe

DATA = Path(__file__).parent / "data"
POSITIVE = 0.05  # VADER's own threshold for "positive"


def pairs() -> list[dict[str, str]]:
    lines = (DATA / "sentiment_pairs.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def prompts(split: str) -> list[str]:
    return json.loads((DATA / "neutral_prompts.json").read_text())[split]


@torch.no_grad()
def greedy_tokens(
    model: torch.nn.Module, tokenizer: Any, texts: list[str], new: int
) -> list[list[int]]:
    """Greedy continuations, one prompt at a time (as the server's Generate does)."""
    out = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")
        full = model.generate(
            **ids,
            max_new_tokens=new,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.eos_token_id,
        )
        out.append(full[0, ids.input_ids.shape[1] :].tolist())
    return out


def positive_share(tokenizer: Any, continuations: list[list[int]]) -> tuple[float, list[str]]:
    judge = SentimentIntensityAnalyzer()
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in continuations]
    positive = [judge.polarity_scores(t)["compound"] > POSITIVE for t in texts]
    return sum(positive) / len(positive), texts


def perplexity(model: torch.nn.Module, tokenizer: Any, tokens: int) -> float:
    return wikitext_perplexity(model, tokenizer, max_tokens=tokens, window=512)


def steer(
    base: torch.nn.Module,
    tokenizer: Any,
    layers: list[int],
    coefficient: float,
    bake: bool | None,
    args: argparse.Namespace,
) -> tuple[torch.nn.Module, Any, SteerConfig]:
    settings = {"token": args.token, "aggregate": args.aggregate}
    config = SteerConfig.model_validate(
        {
            "pairs": pairs(),
            "layers": layers,
            "coefficient": coefficient,
            "bake": bake,
            "evaluate_perplexity": False,
            **{k: v for k, v in settings.items() if v is not None},
        }
    )
    model = copy.deepcopy(base)
    context = MethodContext(model_digest="bench", cache_dir=Path(tempfile.mkdtemp()))
    return model, get_method("steer").run(model, tokenizer, config, context), config


def tune(base: torch.nn.Module, tokenizer: Any, args: argparse.Namespace, ppl_base: float) -> None:
    texts = prompts("dev")
    share, _ = positive_share(tokenizer, greedy_tokens(base, tokenizer, texts, args.tokens))
    print(f"dev prompts: {len(texts)}; base positive share {share:.2f}, perplexity {ppl_base:.3f}")
    print(f"token {args.token or 'default'}, aggregate {args.aggregate or 'default'}")
    print(f"{'layers':>8} {'coef':>5} {'share':>6} {'ppl ratio':>9} {'|v|':>7}")
    for layer_set in args.layers:
        layers = [int(part) for part in layer_set.split(",")]
        for coefficient in args.coefficients:
            model, result, _ = steer(base, tokenizer, layers, coefficient, None, args)
            share, _ = positive_share(
                tokenizer, greedy_tokens(model, tokenizer, texts, args.tokens)
            )
            ratio = perplexity(model, tokenizer, args.ppl_tokens) / ppl_base
            norm = result.metrics["vector_norm"]
            print(
                f"{layer_set:>8} {coefficient:>5.1f} {share:>6.2f} {ratio:>9.4f} {norm:>7.2f}",
                flush=True,
            )


def report(base: torch.nn.Module, loaded: Any, args: argparse.Namespace, ppl_base: float) -> None:
    tokenizer = loaded.tokenizer
    texts = prompts("report")
    default = SteerConfig(pairs=pairs()).layer_indices(base.config)
    layers = [int(part) for part in args.layer.split(",")] if args.layer else default
    rows: list[tuple[str, float, float, list[list[int]]]] = []
    started = time.perf_counter()
    base_tokens = greedy_tokens(base, tokenizer, texts, args.tokens)
    rows.append(("base", positive_share(tokenizer, base_tokens)[0], 1.0, base_tokens))
    print(f"base generation: {time.perf_counter() - started:.1f} s", flush=True)

    baked, result, config = steer(base, tokenizer, layers, args.coefficient, None, args)
    baked_tokens = greedy_tokens(baked, tokenizer, texts, args.tokens)
    ratio = perplexity(baked, tokenizer, args.ppl_tokens) / ppl_base
    share, samples = positive_share(tokenizer, baked_tokens)
    rows.append(("steer, baked", share, ratio, baked_tokens))

    hook_model, hooked, _ = steer(base, tokenizer, layers, args.coefficient, False, args)
    with attach_hooks(hook_model, hooked.artifacts):
        hooked_tokens = greedy_tokens(hook_model, tokenizer, texts, args.tokens)
        hook_ratio = perplexity(hook_model, tokenizer, args.ppl_tokens) / ppl_base
    rows.append(
        ("steer, hooks", positive_share(tokenizer, hooked_tokens)[0], hook_ratio, hooked_tokens)
    )

    with tempfile.TemporaryDirectory() as tmp:
        store = CheckpointStore(Path(tmp) / "store")
        root = store.import_model(base, tokenizer, reference="smollm2-135m")
        version = store.commit(
            root.id,
            result.changed,
            operations=[config.model_dump(mode="json")],
            config_overrides=result.config_overrides,
        )
        folder = store.export(version.id, Path(tmp) / "export")
        plain = AutoModelForCausalLM.from_pretrained(folder).eval()
        plain_tokens = greedy_tokens(plain, tokenizer, texts, args.tokens)
        plain_ratio = perplexity(plain, tokenizer, args.ppl_tokens) / ppl_base
    rows.append(
        (
            "export, from_pretrained",
            positive_share(tokenizer, plain_tokens)[0],
            plain_ratio,
            plain_tokens,
        )
    )

    print(
        f"report prompts: {len(texts)}, {args.tokens} greedy tokens each; layers {layers}, "
        f"coefficient {args.coefficient}; |v| {result.metrics['vector_norm']:.2f}; "
        f"held-out pair separation {result.metrics['heldout_separation']:.2f}; "
        f"projection {result.metrics['projection_before']:.2f} -> "
        f"{result.metrics['projection_after']:.2f}; baked {bool(result.metrics['baked'])}, "
        f"config overrides {result.config_overrides}"
    )
    print(f"{'model':<26} {'positive share':>14} {'ppl ratio':>9}")
    for name, share, ratio, _ in rows:
        print(f"{name:<26} {share:>14.2f} {ratio:>9.4f}")
    same = sum(a == b for a, b in zip(plain_tokens, hooked_tokens, strict=True))
    baked_same = sum(a == b for a, b in zip(baked_tokens, hooked_tokens, strict=True))
    print(
        f"greedy tokens identical, export (plain transformers) vs hooks: {same}/{len(texts)}; "
        f"in-memory baked vs hooks: {baked_same}/{len(texts)}"
    )
    for text, sample in list(zip(texts, samples, strict=True))[:5]:
        print(f"  {text!r} -> {sample!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tune", action="store_true", help="grid on the dev prompts")
    parser.add_argument(
        "--layers", nargs="+", default=["4", "6", "8", "6,7,8"], help="tune: layer sets, a,b,c"
    )
    parser.add_argument("--coefficients", type=float, nargs="+", default=[2, 4, 6, 8, 12])
    parser.add_argument("--layer", default=None, help="report: layers a,b,c (default: config's)")
    parser.add_argument("--coefficient", type=float, default=DEFAULT_COEFFICIENT)
    parser.add_argument("--token", choices=["last", "mean"], default=None)
    parser.add_argument("--aggregate", choices=["mean", "pca"], default=None)
    parser.add_argument("--tokens", type=int, default=30)
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe())
    loaded = load("smollm2-135m")
    base = loaded.model
    ppl_base = perplexity(base, loaded.tokenizer, args.ppl_tokens)
    if args.tune:
        tune(base, loaded.tokenizer, args, ppl_base)
    else:
        report(base, loaded, args, ppl_base)


if __name__ == "__main__":
    main()
