"""ROME's v* in bfloat16 without a copy of the model (issue 34), side by side in one process on
SmolLM2-135M (CounterFact dev): a whole-model bfloat16 copy (what v* ran through before), the
layers v* runs cast in place for the optimisation (``knowledge.precision``, now), and float32.

    python benchmarks/vstar_precision.py --n 3 --rounds 2

Each setting optimises the same facts' deltas at ROME's layer, one fact at a time, the copy
made per fact as the cast is; the rounds alternate the settings' order. Prints CPU seconds
(summed over threads: steadier than wall seconds on a shared machine) and wall seconds per
setting, each over the copy's, the final losses and steps, and each delta's cosine to the
float32 one.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from modelsurgery.editing.data import shared_data_path
from modelsurgery.editing.knowledge.config import family_defaults
from modelsurgery.editing.knowledge.facts import Fact
from modelsurgery.editing.knowledge.targets import VStarBatch, optimise_batch
from modelsurgery.editing.registry import MethodContext
from modelsurgery.editing.rome import RomeConfig
from modelsurgery.models import load
from modelsurgery.models.adapters import get_adapter
from modelsurgery.models.hardware import describe

SETTINGS = ("copy_bf16", "cast_upper", "float32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3, help="facts")
    parser.add_argument("--offset", type=int, default=1000, help="first CounterFact dev case")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe(), flush=True)

    loaded = load("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    records = json.loads(shared_data_path("counterfact/counterfact-dev.json").read_text())
    facts = [Fact.model_validate(r) for r in records[args.offset : args.offset + args.n]]
    config = RomeConfig(facts=facts[:1])
    layer = config.edit_layer(model.config)
    defaults = family_defaults(get_adapter(model).model_type)
    params = config.vstar_params(defaults, defaults.rome_clamp)
    context = MethodContext(model_digest=loaded.digest, cache_dir=Path("/tmp/vstar-precision"))

    def run(setting: str) -> list[tuple[float, float, float, int, torch.Tensor]]:
        out = []
        for fact in facts:
            cpu, wall = time.process_time(), time.perf_counter()
            through, dtype = model, torch.bfloat16
            if setting == "copy_bf16":
                through = copy.deepcopy(model).to(dtype)
            elif setting == "float32":
                dtype = torch.float32
            batch = VStarBatch((fact,), layer, "mlp_out", params, config.templates(), dtype)
            deltas, losses, steps = optimise_batch(through, tokenizer, batch, context)
            del through
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            out.append((cpu, wall, losses[0], steps[0], deltas[0]))
        return out

    results: dict[str, list[tuple[float, float, float, int, torch.Tensor]]] = {}
    for round_ in range(args.rounds):
        order = SETTINGS if round_ % 2 == 0 else tuple(reversed(SETTINGS))
        for setting in order:
            results.setdefault(setting, []).extend(run(setting))
    first = results[SETTINGS[0]]
    for setting, rows in results.items():
        cpu, wall = sum(r[0] for r in rows), sum(r[1] for r in rows)
        cosines = [
            float(torch.nn.functional.cosine_similarity(r[4], f[4], dim=0))
            for r, f in zip(rows, results["float32"], strict=True)
        ]
        print(
            json.dumps(
                {
                    "setting": setting,
                    "layer": layer,
                    "cpu_seconds": round(cpu, 1),
                    "cpu_ratio": round(cpu / sum(r[0] for r in first), 3),
                    "wall_seconds": round(wall, 1),
                    "wall_ratio": round(wall / sum(r[1] for r in first), 3),
                    "losses": [round(r[2], 3) for r in rows[: len(facts)]],
                    "steps": [r[3] for r in rows[: len(facts)]],
                    "cosine_to_float32": [round(c, 4) for c in cosines[: len(facts)]],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
