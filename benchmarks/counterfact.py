"""CounterFact edits on SmolLM2-135M: ROME one fact at a time on the fresh base (weights restored
between edits, as EasyEdit's benchmark does) and MEMIT as one batch.

Prints efficacy / paraphrase / locality / probability gain, WikiText-2 perplexity before and
after, seconds per edit (second-moment statistics timed apart), and for the first ROME edits
the ratio of the edit's time to the passes it cannot avoid (one prefix pass + the same number
of v* forward/backward passes over the tail), measured in the same run.

    python benchmarks/counterfact.py --method rome --n 50
    python benchmarks/counterfact.py --method memit --memit-n 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from modelsurgery.editing.data import shared_data_path
from modelsurgery.editing.knowledge import tokens as tk
from modelsurgery.editing.knowledge.facts import Fact
from modelsurgery.editing.knowledge.runner import (
    CachedPrefix,
    align_lookups,
    logits_at,
    output_edit,
)
from modelsurgery.editing.knowledge.stats import second_moments
from modelsurgery.editing.knowledge.templates import (
    KL_TEMPLATE,
    prefix_length,
    with_bare_first,
)
from modelsurgery.editing.knowledge.vstar import frozen_parameters
from modelsurgery.editing.memit import MemitConfig
from modelsurgery.editing.memit import run as memit_run
from modelsurgery.editing.registry import MethodContext
from modelsurgery.editing.rome import RomeConfig
from modelsurgery.editing.rome import run as rome_run
from modelsurgery.evaluation.facts import fact_figures, score_facts
from modelsurgery.evaluation.perplexity import wikitext_perplexity
from modelsurgery.models import load
from modelsurgery.models.adapters import get_adapter
from modelsurgery.models.hardware import describe


def parse_layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    if "-" in text:
        first, last = (int(x) for x in text.split("-"))
        return list(range(first, last + 1))
    return [int(x) for x in text.split(",")]


def hyper(args: argparse.Namespace) -> dict[str, Any]:
    pairs = {
        "v_steps": args.v_steps,
        "v_lr": args.lr,
        "kl_factor": args.kl,
        "weight_decay": args.weight_decay,
        "clamp_factor": args.clamp,
        "stats_samples": args.stats_samples,
    }
    return {k: v for k, v in pairs.items() if v is not None}


def floor_seconds(model: Any, tok: Any, fact: Fact, layer: int, steps: int) -> float:
    """The passes a ROME edit cannot avoid: one prefix pass and ``steps`` tail forward +
    backward passes with the delta at the edit layer's MLP output (no bookkeeping)."""
    adapter = get_adapter(model)
    templates = with_bare_first(tuple(RomeConfig(facts=[fact]).templates()))
    seqs = [
        tk.prompt_with_answer(
            tok,
            t.replace("{}", fact.text),
            fact.target,
            fact.subject,
            drop_last=True,
            search_from=prefix_length(t),
        )
        for t in templates
    ]
    seqs.append(tk.subject_prompt(tok, KL_TEMPLATE.format(fact.subject), fact.subject))
    start = time.perf_counter()
    batch = align_lookups(seqs, tk.pad_id_of(tok))
    prefix = CachedPrefix(model, adapter, layer, batch)
    delta = torch.zeros(adapter.hidden_size, requires_grad=True)
    width = batch.ids.shape[1] - batch.split
    rows = torch.arange(len(seqs)).repeat_interleave(width)
    cols = torch.arange(width).repeat(len(seqs))

    def add(out: torch.Tensor) -> torch.Tensor:
        return torch.cat([out[:, :1] + delta, out[:, 1:]], 1)

    with frozen_parameters(model), output_edit(adapter.mlp_out(layer).module, add):
        for _ in range(steps):
            hidden = prefix.tail_hidden()
            logits_at(model, adapter, hidden, rows, cols).logsumexp(-1).sum().backward()
    return time.perf_counter() - start


def run_rome(args, loaded, facts, ctx) -> None:
    model, tok = loaded.model, loaded.tokenizer
    adapter = get_adapter(model)
    config = RomeConfig(facts=facts[:1], layer=args.layer, **hyper(args))
    layer = config.edit_layer(model.config)
    t0 = time.perf_counter()
    second_moments(model, tok, adapter, [layer], ctx, config.stats_settings())
    print(f"rome: statistics for layer {layer}: {time.perf_counter() - t0:.1f} s (cached after)")
    weight = adapter.mlp_out(layer).weight
    original = weight.detach().clone()
    before = score_facts(model, tok, adapter, facts)
    after, seconds, ratios, ppl_after, steps = [], [], [], [], []
    for i, fact in enumerate(facts):
        cfg = RomeConfig(
            facts=[fact], layer=layer, evaluate=False, evaluate_perplexity=False, **hyper(args)
        )
        t0 = time.perf_counter()
        result = rome_run(model, tok, cfg, ctx)
        seconds.append(time.perf_counter() - t0)
        steps.append(result.metrics["v_steps_used"])
        after += score_facts(model, tok, adapter, [fact])
        if args.ppl_every and i % args.ppl_every == 0:
            ppl_after.append(wikitext_perplexity(model, tok, max_tokens=args.ppl_tokens))
        with torch.no_grad():
            weight.copy_(original)
        if i < args.floor_edits:
            floor = floor_seconds(model, tok, fact, layer, int(max(1, steps[-1])))
            ratios.append(seconds[-1] / floor)
            print(f"  edit {i}: {seconds[-1]:.2f} s, floor {floor:.2f} s, ratio {ratios[-1]:.2f}")
        print(f"  [{i + 1}/{len(facts)}] {seconds[-1]:.2f} s, steps {steps[-1]:.0f}", flush=True)
    report("rome", fact_figures(after, before=before), seconds, steps, ratios, ppl_after, args)
    if args.easyedit_checkout:
        run_easyedit_peer(args, loaded, facts[: args.easyedit_n], layer, before, seconds)


def run_easyedit_peer(args, loaded, facts, layer, before_all, our_seconds) -> None:
    """EasyEdit's ROME on the same model and facts, in this process (its Llama settings: 25
    steps, lr 0.5, KL 0.0625, clamp 4, weight decay 1e-3, second-moment adjustment off)."""
    from easyedit_peer import load_easyedit_rome

    model, tok = loaded.model, loaded.tokenizer
    adapter = get_adapter(model)
    peer = load_easyedit_rome(args.easyedit_checkout)
    weight = adapter.mlp_out(layer).weight
    original = weight.detach().clone()
    after, seconds, ppl_after = [], [], []
    for i, fact in enumerate(facts):
        record = fact.model_dump(exclude_none=True)
        record["prompt"] = fact.text.replace(fact.subject, "{}", 1)
        seconds.append(peer.edit(model, tok, record, layer=layer))
        after += score_facts(model, tok, adapter, [fact])
        if args.ppl_every and i % args.ppl_every == 0:
            ppl_after.append(wikitext_perplexity(model, tok, max_tokens=args.ppl_tokens))
        with torch.no_grad():
            weight.copy_(original)
        print(f"  easyedit [{i + 1}/{len(facts)}] {seconds[-1]:.2f} s", flush=True)
    report(
        "easyedit",
        fact_figures(after, before=before_all[: len(facts)]),
        seconds,
        [0],
        [],
        ppl_after,
        args,
    )
    ours = statistics.median(our_seconds[: len(facts)])
    print(
        f"median seconds per edit on these {len(facts)} facts: ours {ours:.2f}, "
        f"EasyEdit {statistics.median(seconds):.2f}, ratio {ours / statistics.median(seconds):.3f} "
        "(EasyEdit's first edit includes its context-template generation)"
    )


def run_memit(args, loaded, facts, ctx) -> None:
    model, tok = loaded.model, loaded.tokenizer
    adapter = get_adapter(model)
    config = MemitConfig(facts=facts, layers=parse_layers(args.layers), **hyper(args))
    layers = config.edit_layers(model.config)
    t0 = time.perf_counter()
    second_moments(model, tok, adapter, layers, ctx, config.stats_settings())
    print(f"memit: statistics for layers {layers}: {time.perf_counter() - t0:.1f} s")
    before = score_facts(model, tok, adapter, facts)
    extra = {"mom2_weight": args.mom2_weight} if args.mom2_weight else {}
    cfg = MemitConfig(
        facts=facts,
        layers=layers,
        evaluate=False,
        evaluate_perplexity=False,
        **hyper(args),
        **extra,
    )
    t0 = time.perf_counter()
    result = memit_run(model, tok, cfg, ctx)
    total = time.perf_counter() - t0
    after = score_facts(model, tok, adapter, facts)
    ppl = [wikitext_perplexity(model, tok, max_tokens=args.ppl_tokens)] if args.ppl_every else []
    per_fact = [total / len(facts)]
    print(f"memit: mean v* loss {result.metrics['v_loss']:.4f}")
    report(
        "memit",
        fact_figures(after, before=before),
        per_fact,
        [result.metrics["v_steps_used"]],
        [],
        ppl,
        args,
        total=total,
    )


def report(name, metrics, seconds, steps, ratios, ppl_after, args, total=None) -> None:
    lines = {f"{name}.{k}": round(v, 4) for k, v in metrics.items()}
    lines[f"{name}.seconds_per_edit_median"] = round(statistics.median(seconds), 3)
    lines[f"{name}.seconds_per_edit_mean"] = round(statistics.mean(seconds), 3)
    if total is not None:
        lines[f"{name}.seconds_total"] = round(total, 2)
    if steps:
        lines[f"{name}.v_steps_mean"] = round(statistics.mean(steps), 2)
    if ratios:
        lines[f"{name}.time_over_floor"] = round(statistics.median(ratios), 3)
    if ppl_after:
        lines[f"{name}.perplexity_before"] = round(args.ppl_base, 3)
        lines[f"{name}.perplexity_after_mean"] = round(statistics.mean(ppl_after), 3)
        lines[f"{name}.perplexity_ratio"] = round(statistics.mean(ppl_after) / args.ppl_base, 4)
    print(json.dumps(lines, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", choices=["rome", "memit", "both"], default="both")
    parser.add_argument("--n", type=int, default=50, help="ROME cases")
    parser.add_argument("--memit-n", type=int, default=200, help="MEMIT facts in one batch")
    parser.add_argument("--offset", type=int, default=0, help="first case index")
    parser.add_argument("--layer", type=int, help="ROME layer override")
    parser.add_argument("--layers", help="MEMIT layers, e.g. 3-8 or 3,5,7")
    parser.add_argument("--v-steps", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--kl", type=float)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--clamp", type=float)
    parser.add_argument("--mom2-weight", type=float)
    parser.add_argument("--stats-samples", type=int)
    parser.add_argument("--ppl-tokens", type=int, default=2048)
    parser.add_argument(
        "--ppl-every", type=int, default=10, help="ROME: perplexity every k edits; 0 = off"
    )
    parser.add_argument("--floor-edits", type=int, default=3)
    parser.add_argument("--easyedit-checkout", type=Path, help="zjunlp/EasyEdit clone (peer)")
    parser.add_argument("--easyedit-n", type=int, default=10, help="facts for the peer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "modelsurgery"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe(), flush=True)
    torch.manual_seed(0)

    loaded = load("smollm2-135m")
    records = json.loads(shared_data_path("counterfact/counterfact-dev.json").read_text())
    ctx = MethodContext(model_digest=loaded.digest, cache_dir=Path(args.cache_dir))
    args.ppl_base = (
        wikitext_perplexity(loaded.model, loaded.tokenizer, max_tokens=args.ppl_tokens)
        if args.ppl_every
        else 0.0
    )
    if args.method in ("rome", "both"):
        facts = [Fact.model_validate(r) for r in records[args.offset : args.offset + args.n]]
        run_rome(args, loaded, facts, ctx)
    if args.method in ("memit", "both"):
        facts = [Fact.model_validate(r) for r in records[args.offset : args.offset + args.memit_n]]
        run_memit(args, loaded, facts, ctx)


if __name__ == "__main__":
    main()
