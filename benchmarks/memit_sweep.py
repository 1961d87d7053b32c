"""MEMIT hyperparameter sweep on SmolLM2-135M: the v* targets of a batch of CounterFact facts
are optimised once (they depend only on the last edited layer and the v* settings), then each
(first layer, lambda) pair is applied to the fresh weights and scored.

    python benchmarks/memit_sweep.py --n 200 --offset 1000 --last 8 --grid 2:5000 2:7500 3:15000
    python benchmarks/memit_sweep.py --n 100 --offset 9000 --grid 2:5000 --null-space 1 --ridge 1 10

``--stats-samples N ...`` repeats each grid entry with C from N calibration windows
(``stats_samples``; default the config's).
``--null-space T ...`` adds ``projection: null_space`` settings (``knowledge.nullspace``) for each
T, ``--ridge`` value and ``--nullspace-mom2`` weight, on the first grid entry's layers: the
update restricted to the eigenvectors of C with eigenvalue below T times C's median eigenvalue,
with that ridge (``nullspace_l2``, same unit) and that weight on C's share left there.
``--targets FILE`` keeps the v* targets of a run (computed once, reused by the next).
``--chunked JSON ...`` adds settings written as ``memit`` writes them (``knowledge.chunks``:
chunks of ``chunk`` facts, each solve keeping the earlier chunks' keys; ``projection``
``none`` or ``null_space``; ``lambda``; ``first`` layer), every chunk reusing the v* targets
read on the base model (a job re-reads later chunks' targets on the edited model):

    python benchmarks/memit_sweep.py --n 400 --offset 6000 --grid 2:5000 \
        --chunked '{"chunk": 100}' '{"chunk": 100, "projection": "null_space"}'
Prints one JSON line per setting: efficacy, paraphrase, locality, probability gain, WikiText-2
perplexity over the unedited model's (``--ppl-tokens``, 0 = skip), the mean distance left
between the last layer's output and z, and the update time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from modelsurgery.editing import memit
from modelsurgery.editing.data import shared_data_path
from modelsurgery.editing.knowledge.chunks import ChunkPlan, write_in_chunks
from modelsurgery.editing.knowledge.config import family_defaults
from modelsurgery.editing.knowledge.facts import Fact
from modelsurgery.editing.knowledge.keys import keys_and_outputs
from modelsurgery.editing.knowledge.nullspace import null_space, projected_update
from modelsurgery.editing.knowledge.stats import layer_statistics
from modelsurgery.editing.knowledge.targets import Targets
from modelsurgery.editing.memit import MemitConfig
from modelsurgery.editing.memit.method import memit_update
from modelsurgery.editing.registry import MethodContext
from modelsurgery.evaluation.facts import fact_figures, score_facts
from modelsurgery.evaluation.perplexity import wikitext_perplexity
from modelsurgery.models import load
from modelsurgery.models.adapters import get_adapter
from modelsurgery.models.hardware import describe


def vstar_targets(model, tok, config, context) -> torch.Tensor:
    """z [F, d]: the last edited layer's outputs plus v*, as ``memit.run`` computes them."""
    return (
        last_outputs(model, tok, config) + memit.vstar_targets(model, tok, config, context).deltas
    )


def last_outputs(model, tok, config) -> torch.Tensor:
    """[F, d]: the last edited layer's outputs for the facts, on the model as it is now."""
    last = config.edit_layers(model.config)[-1]
    _, outputs = keys_and_outputs(
        model,
        tok,
        get_adapter(model),
        config.facts,
        key_layer=last,
        out_layer=last,
        templates=config.templates(),
    )
    return outputs


def restorer(adapter, layers: list[int]):
    """A function that puts the down projections of ``layers`` back as they are now."""
    original = {layer: adapter.mlp_out(layer).weight.detach().clone() for layer in layers}

    def restore() -> None:
        with torch.no_grad():
            for layer, weight in original.items():
                adapter.mlp_out(layer).weight.copy_(weight)

    return restore


def write_chunked(
    model, tok, config, context, deltas: torch.Tensor, setting: dict, layers: list[int]
) -> None:
    """``setting``'s facts written to ``layers`` chunk by chunk through ``write_in_chunks``,
    each chunk toward its facts' base-model v* ``deltas`` [F, d]."""
    adapter = get_adapter(model)
    stats = layer_statistics(model, tok, adapter, layers, context, config.stats_settings())
    weight = setting.get("lambda", config.lambda_weight(model.config))
    threshold, ridge = config.projection_settings(family_defaults(adapter.model_type))
    bases = (
        {layer: null_space(stats[layer], threshold) for layer in layers}
        if setting.get("projection", "none") == "null_space"
        else {}
    )
    index = {id(fact): i for i, fact in enumerate(config.facts)}

    def optimise(facts) -> Targets:
        rows = [index[id(fact)] for fact in facts]
        return Targets(deltas[rows], [0.0] * len(rows), [0] * len(rows), torch.float32)

    def solve(layer, keys, residuals, kept):
        if layer not in bases:
            return memit_update(keys, residuals, stats[layer].mom2, weight, kept)
        earlier = None if kept is None else kept.double()
        return projected_update(keys, residuals, bases[layer], earlier, ridge, weight)

    plan = ChunkPlan(
        layers=layers,
        chunk=setting.get("chunk", len(config.facts)),
        targets="optimised",
        anchor=1.0,
        second_pass=False,
        templates=config.templates(),
    )
    write_in_chunks(
        model, tok, adapter, config.facts, plan, solve, optimise, lambda *a: None, context
    )


def perplexity_ratio(model, tok, tokens: int, base: float) -> dict[str, float]:
    if not tokens:
        return {}
    return {"perplexity_ratio": round(wikitext_perplexity(model, tok, max_tokens=tokens) / base, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--offset", type=int, default=1000)
    parser.add_argument("--last", type=int, default=8, help="last edited layer (z lives here)")
    parser.add_argument("--clamp", type=float, default=4.0)
    parser.add_argument("--grid", nargs="+", default=["2:5000"], help="FIRST_LAYER:LAMBDA ...")
    parser.add_argument(
        "--stats-samples", type=int, nargs="+", default=[None], help="windows for C, per grid entry"
    )
    parser.add_argument("--null-space", type=float, nargs="*", default=[], help="cuts (x median)")
    parser.add_argument("--ridge", type=float, nargs="+", default=[10.0], help="nullspace_l2")
    parser.add_argument("--nullspace-mom2", type=float, nargs="+", default=[0.0])
    parser.add_argument("--targets", type=Path, help="v* targets file (read if it exists)")
    parser.add_argument("--chunked", nargs="*", default=[], help="chunked settings (JSON)")
    parser.add_argument("--ppl-tokens", type=int, default=4096, help="0 = no perplexity")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "modelsurgery"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe(), flush=True)
    torch.manual_seed(0)

    loaded = load("smollm2-135m")
    model, tok = loaded.model, loaded.tokenizer
    adapter = get_adapter(model)
    records = json.loads(shared_data_path("counterfact/counterfact-dev.json").read_text())
    facts = [Fact.model_validate(r) for r in records[args.offset : args.offset + args.n]]
    context = MethodContext(model_digest=loaded.digest, cache_dir=Path(args.cache_dir))
    config = MemitConfig(facts=facts, layers=[args.last], clamp_factor=args.clamp)
    before = score_facts(model, tok, adapter, facts, neighbourhood=True)
    ppl_base = wikitext_perplexity(model, tok, max_tokens=args.ppl_tokens) if args.ppl_tokens else 0

    start = time.perf_counter()
    if args.targets and args.targets.exists():
        z = torch.load(args.targets)
    else:
        z = vstar_targets(model, tok, config, context)
        if args.targets:
            torch.save(z, args.targets)
    print(f"v* targets for {len(facts)} facts: {time.perf_counter() - start:.1f} s", flush=True)

    default_samples = config.stats_samples
    settings = [
        (int(i.split(":")[0]), float(i.split(":")[1]), None, 0.0, n or default_samples)
        for i in args.grid
        for n in args.stats_samples
    ]
    first_layer = settings[0][0]
    settings += [
        (first_layer, r, t, m, default_samples)
        for t in args.null_space
        for r in args.ridge
        for m in args.nullspace_mom2
    ]
    for first, weight, threshold, inside, samples in settings:
        layers = list(range(first, args.last + 1))
        calibration = config.model_copy(update={"stats_samples": samples}).stats_settings()
        stats = layer_statistics(model, tok, adapter, layers, context, calibration)
        restore = restorer(adapter, layers)
        start = time.perf_counter()
        for i, layer in enumerate(layers):
            keys, current = keys_and_outputs(
                model,
                tok,
                adapter,
                facts,
                key_layer=layer,
                out_layer=args.last,
                templates=config.templates(),
            )
            residuals = (z - current) / (len(layers) - i)
            if threshold is None:
                update = memit_update(keys, residuals, stats[layer].mom2, weight)
            else:
                space = null_space(stats[layer], threshold)
                update = projected_update(keys, residuals, space, None, weight, inside)
            with torch.no_grad():
                adapter.mlp_out(layer).weight.add_(update.to(adapter.mlp_out(layer).weight))
        seconds = time.perf_counter() - start
        _, final = keys_and_outputs(
            model,
            tok,
            adapter,
            facts,
            key_layer=args.last,
            out_layer=args.last,
            templates=config.templates(),
        )
        after = score_facts(model, tok, adapter, facts, neighbourhood=True)
        metrics = fact_figures(after, before=before)
        line = {
            "layers": f"{first}-{args.last}",
            "lambda": weight,
            "null_space": threshold,
            "nullspace_mom2": inside,
            "stats_samples": samples,
            **{k: round(v, 3) for k, v in metrics.items()},
            **perplexity_ratio(model, tok, args.ppl_tokens, ppl_base),
            "z_distance_left": round(float((z - final).norm(dim=1).mean()), 3),
            "update_s": round(seconds, 1),
        }
        print(json.dumps(line), flush=True)
        restore()
    deltas = z - last_outputs(model, tok, config) if args.chunked else None  # [F, d]
    for text in args.chunked:
        setting = json.loads(text)
        layers = list(range(setting.get("first", 2), args.last + 1))
        restore = restorer(adapter, layers)
        start = time.perf_counter()
        write_chunked(model, tok, config, context, deltas, setting, layers)
        seconds = time.perf_counter() - start
        after = score_facts(model, tok, adapter, facts, neighbourhood=True)
        line = {
            **setting,
            **{k: round(v, 3) for k, v in fact_figures(after, before=before).items()},
            **perplexity_ratio(model, tok, args.ppl_tokens, ppl_base),
            "update_s": round(seconds, 1),
        }
        print(json.dumps(line), flush=True)
        restore()


if __name__ == "__main__":
    main()
