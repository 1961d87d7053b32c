"""v* seconds per fact by batch size and dtype on SmolLM2-135M (CounterFact dev), side by side
in one process: the basis of MEMIT's ``fact_batch`` and ``vstar_dtype`` defaults.

    python benchmarks/vstar_batches.py --n 64 --settings 1:auto 8:auto 16:auto 64:auto 16:float32

Each setting optimises the same facts' deltas at MEMIT's last edited layer (batches cut from the
facts sorted by length, ``knowledge.targets``); prints seconds per fact, mean steps and loss,
and each setting's time over the first setting's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from modelsurgery.editing.data import shared_data_path
from modelsurgery.editing.knowledge.facts import Fact
from modelsurgery.editing.memit import MemitConfig, vstar_targets
from modelsurgery.editing.registry import MethodContext
from modelsurgery.models import load
from modelsurgery.models.hardware import describe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="facts")
    parser.add_argument("--offset", type=int, default=9000, help="first CounterFact dev case")
    parser.add_argument("--settings", nargs="+", default=["8:auto", "16:auto", "16:float32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "modelsurgery"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe(), flush=True)
    records = json.loads(shared_data_path("counterfact/counterfact-dev.json").read_text())
    facts = [Fact.model_validate(r) for r in records[args.offset : args.offset + args.n]]
    loaded = load("smollm2-135m")
    model, tok = loaded.model, loaded.tokenizer
    context = MethodContext(model_digest=loaded.digest, cache_dir=Path(args.cache_dir))
    base = MemitConfig(facts=facts)
    first: float | None = None
    for setting in args.settings:
        size, dtype = setting.split(":")
        config = base.model_copy(update={"fact_batch": int(size), "vstar_dtype": dtype})
        start = time.perf_counter()
        targets = vstar_targets(model, tok, config, context)
        per_fact = (time.perf_counter() - start) / len(facts)
        first = first or per_fact
        row = {
            "fact_batch": int(size),
            "vstar_dtype": dtype,
            "resolved": str(targets.dtype).removeprefix("torch."),
            "seconds_per_fact": round(per_fact, 3),
            "over_first": round(per_fact / first, 3),
            "mean_steps": round(sum(targets.steps) / len(facts), 2),
            "mean_loss": round(sum(targets.losses) / len(facts), 4),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
