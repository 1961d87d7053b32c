"""MEMIT hyperparameter sweep on SmolLM2-135M: the v* targets of a batch of CounterFact facts
are optimised once (they depend only on the last edited layer and the v* settings), then each
(first layer, lambda) pair is applied to the fresh weights and scored.

    python benchmarks/memit_sweep.py --n 200 --offset 1000 --last 8 --grid 2:5000 2:7500 3:15000
    python benchmarks/memit_sweep.py --n 200 --offset 1000 --last 8 --grid 2:10 --null-space 0.01

``--null-space T`` replaces MEMIT's lambda * C regulariser by an AlphaEdit-style projection
onto the eigenvectors of C with eigenvalue below T (lambda is then AlphaEdit's L2 weight).
Prints one JSON line per setting: efficacy, paraphrase, locality, probability gain, the mean
distance left between the last layer's output and z, and the update time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from modelsurgery.editing.data import shared_data_path
from modelsurgery.editing.knowledge.config import family_defaults
from modelsurgery.editing.knowledge.evaluate import edit_metrics, score_facts
from modelsurgery.editing.knowledge.facts import Fact
from modelsurgery.editing.knowledge.keys import keys_and_outputs
from modelsurgery.editing.knowledge.stats import second_moments
from modelsurgery.editing.knowledge.vstar import optimize_deltas
from modelsurgery.editing.memit import MemitConfig
from modelsurgery.editing.memit.method import memit_update
from modelsurgery.editing.registry import MethodContext
from modelsurgery.models import load
from modelsurgery.models.adapters import get_adapter
from modelsurgery.models.hardware import describe


def null_space_update(
    keys: torch.Tensor, residuals: torch.Tensor, mom2: torch.Tensor, weight: float, threshold: float
) -> torch.Tensor:
    """[out, in] update (P K K^T + weight I)^-1 P K R, P = projector on C's small directions."""
    values, vectors = torch.linalg.eigh(mom2.double())
    small = vectors[:, values < threshold]
    projector = small @ small.T
    k = keys.double().T
    system = projector @ (k @ k.T) + weight * torch.eye(k.shape[0], dtype=torch.float64)
    return torch.linalg.solve(system, projector @ k @ residuals.double()).T.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--offset", type=int, default=1000)
    parser.add_argument("--last", type=int, default=8, help="last edited layer (z lives here)")
    parser.add_argument("--clamp", type=float, default=4.0)
    parser.add_argument("--grid", nargs="+", default=["2:5000"], help="FIRST_LAYER:LAMBDA ...")
    parser.add_argument("--null-space", type=float, help="AlphaEdit-style eigenvalue threshold")
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
    before = score_facts(model, tok, adapter, facts)

    start = time.perf_counter()
    params = config.vstar_params(family_defaults(adapter.model_type), args.clamp)
    targets = []
    for first in range(0, len(facts), config.fact_batch):
        result = optimize_deltas(
            model,
            tok,
            adapter,
            facts[first : first + config.fact_batch],
            layer=args.last,
            site="layer",
            params=params,
            templates=config.templates(),
            context=context,
        )
        targets.append(result.target_init + result.deltas)
    z = torch.cat(targets)
    print(f"v* targets for {len(facts)} facts: {time.perf_counter() - start:.1f} s", flush=True)

    for item in args.grid:
        first, weight = int(item.split(":")[0]), float(item.split(":")[1])
        layers = list(range(first, args.last + 1))
        mom2 = second_moments(model, tok, adapter, layers, context, config.stats_settings())
        original = {layer: adapter.mlp_out(layer).weight.detach().clone() for layer in layers}
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
            if args.null_space is None:
                update = memit_update(keys, residuals, mom2[layer], weight)
            else:
                update = null_space_update(keys, residuals, mom2[layer], weight, args.null_space)
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
        metrics = edit_metrics(before, score_facts(model, tok, adapter, facts))
        line = {
            "layers": f"{first}-{args.last}",
            "lambda": weight,
            "null_space": args.null_space,
            **{k: round(v, 3) for k, v in metrics.items()},
            "z_distance_left": round(float((z - final).norm(dim=1).mean()), 3),
            "update_s": round(seconds, 1),
        }
        print(json.dumps(line), flush=True)
        with torch.no_grad():
            for layer in layers:
                adapter.mlp_out(layer).weight.copy_(original[layer])


if __name__ == "__main__":
    main()
