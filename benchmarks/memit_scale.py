"""Knowledge editing at scale on SmolLM2-135M (CounterFact dev): MEMIT with thousands of facts in
one job, and sequential editing (a chain of jobs, each on the previous version), with and
without the null-space projection, side by side in one run.

    python benchmarks/memit_scale.py --memit-n 1000 --projection none null_space
    python benchmarks/memit_scale.py --memit-n 100 --offset 9000 --vstar-dtype float32 auto
    python benchmarks/memit_scale.py --memit-n 10000 --projection none
    python benchmarks/memit_scale.py --sequential 100 --per-job 10 --projection none auto
    python benchmarks/memit_scale.py --sequential 100 --per-job 1 --method rome

Reported facts are CounterFact dev cases from ``--offset`` (default 0); the defaults were chosen on
cases 1000-1199, 8000-8299 and 9000-9099 (``benchmarks/memit_sweep.py``), which only a run of more
than 1,000 facts overlaps (it says so). One job: efficacy / paraphrase / locality against the
unedited model, WikiText-2 perplexity ratio, seconds per fact against the median single-fact ROME
edit of the same run (``--rome-n`` edits on the fresh base, statistics computed before timing), peak
RSS (and peak CUDA memory). Sequential: the chain runs through ``execute_job`` on a real store (the
product's path: each job reads its base's preserved keys), then the final version is scored on all
facts and perplexity against the root. Prints one JSON line per setting, then each setting's figures
over the first setting's.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.editing.data import shared_data_path
from modelsurgery.editing.knowledge.facts import Fact
from modelsurgery.editing.knowledge.stats import layer_statistics
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
from modelsurgery.server.executor import WorkerSettings, execute_job
from modelsurgery.server.model_cache import ModelCache

DEV_CASES = (range(1000, 1200), range(8000, 8300), range(9000, 9100))
QUIET = {"evaluate": False, "evaluate_perplexity": False}


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak resident set of this process so far (Linux: KiB), and peak CUDA memory."""
    peaks = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        peaks["peak_cuda_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return peaks


def median_rome_seconds(model, tok, facts: list[Fact], ctx: MethodContext) -> float:
    """Median seconds of single-fact ROME edits, each on the fresh base (statistics cached
    before the first is timed)."""
    adapter = get_adapter(model)
    config = RomeConfig(facts=facts[:1], **QUIET)
    layer = config.edit_layer(model.config)
    layer_statistics(model, tok, adapter, [layer], ctx, config.stats_settings())
    weight = adapter.mlp_out(layer).weight
    original = weight.detach().clone()
    seconds = []
    for fact in facts:
        start = time.perf_counter()
        rome_run(model, tok, RomeConfig(facts=[fact], **QUIET), ctx)
        seconds.append(time.perf_counter() - start)
        with torch.no_grad():
            weight.copy_(original)
    return statistics.median(seconds)


def one_job(args, model, tok, facts: list[Fact], ctx, rome_s: float, ppl_base: float) -> None:
    adapter = get_adapter(model)
    base = MemitConfig(facts=facts, fact_batch=args.fact_batch, **QUIET)
    layers = base.edit_layers(model.config)
    layer_statistics(model, tok, adapter, layers, ctx, base.stats_settings())
    original = {layer: adapter.mlp_out(layer).weight.detach().clone() for layer in layers}
    before = score_facts(model, tok, adapter, facts)
    rows = []
    for projection in args.projection:
        for dtype in args.vstar_dtype:
            config = base.model_copy(update={"projection": projection, "vstar_dtype": dtype})
            start = time.perf_counter()
            memit_run(model, tok, config, ctx)
            seconds = time.perf_counter() - start
            metrics = fact_figures(score_facts(model, tok, adapter, facts), before=before)
            ppl = wikitext_perplexity(model, tok, max_tokens=args.ppl_tokens)
            row = {
                "setting": f"memit-{len(facts)}",
                "projection": projection,
                "vstar_dtype": dtype,
                **{k: round(v, 4) for k, v in metrics.items()},
                "perplexity_ratio": round(ppl / ppl_base, 4),
                "seconds_total": round(seconds, 1),
                "seconds_per_fact": round(seconds / len(facts), 3),
                "per_fact_vs_median_rome": round(seconds / len(facts) / rome_s, 3),
                **{k: round(v, 2) for k, v in peak_memory(ctx.device).items()},
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            with torch.no_grad():
                for layer in layers:
                    adapter.mlp_out(layer).weight.copy_(original[layer])
    print_ratios(rows)


def chain(args, facts: list[Fact], before: list, projection: str, root: Path) -> dict[str, Any]:
    """``len(facts) / per_job`` jobs, each on the previous one's version, through the
    executor and a real store; returns the final version's figures."""
    store = CheckpointStore(root / "store")
    settings = WorkerSettings(
        store_root=root / "store", cache_dir=Path(args.cache_dir), device=args.device
    )
    cache = ModelCache(2 << 30)
    base, seconds = "smollm2-135m", 0.0
    for first in range(0, len(facts), args.per_job):
        records = [
            f.model_dump(mode="json", exclude_none=True) for f in facts[first:][: args.per_job]
        ]
        operation = {"method": args.method, "facts": records, "projection": projection, **QUIET}
        start = time.perf_counter()
        outcome = execute_job(
            {"base": base, "operations": [operation]},
            store=store,
            cache=cache,
            settings=settings,
            emit=lambda event: None,
            is_cancelled=lambda: False,
        )
        seconds += time.perf_counter() - start
        if outcome.state != "SUCCEEDED":
            raise SystemExit(f"job {first // args.per_job} {outcome.state}: {outcome.error}")
        base = outcome.version_id
        print(f"  {projection}: job {first // args.per_job + 1} -> {base}", flush=True)
    final = load(base, store=store, device=args.device)
    adapter = get_adapter(final.model)
    metrics = fact_figures(score_facts(final.model, final.tokenizer, adapter, facts), before=before)
    ppl = wikitext_perplexity(final.model, final.tokenizer, max_tokens=args.ppl_tokens)
    return {
        "setting": f"sequential-{len(facts)}x{args.per_job}-{args.method}",
        "projection": projection,
        **{k: round(v, 4) for k, v in metrics.items()},
        "perplexity_ratio_vs_root": round(ppl / args.ppl_base, 4),
        "seconds_per_fact": round(seconds / len(facts), 3),
        **{k: round(v, 2) for k, v in peak_memory(torch.device(args.device)).items()},
    }


def print_ratios(rows: list[dict[str, Any]]) -> None:
    """Every setting's figures over the first setting's (same facts, same run)."""
    first = rows[0]
    for row in rows[1:]:
        ratios = {
            f"{name}_ratio": round(row[name] / value, 3)
            for name, value in first.items()
            if isinstance(value, float) and value and name in row
        }
        label = {k: row[k] for k in ("setting", "projection", "vstar_dtype") if k in row}
        print(json.dumps({**label, "over": {k: first[k] for k in label}, **ratios}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memit-n", type=int, help="facts in one MEMIT job (1000, 10000)")
    parser.add_argument("--sequential", type=int, help="facts written as a chain of jobs")
    parser.add_argument("--per-job", type=int, default=10, help="facts per job of the chain")
    parser.add_argument("--method", choices=["memit", "rome"], default="memit", help="chain")
    parser.add_argument(
        "--projection",
        nargs="+",
        choices=["none", "null_space", "auto"],
        default=["none", "null_space"],
        help="settings compared side by side",
    )
    parser.add_argument("--offset", type=int, default=0, help="first reported case")
    parser.add_argument(
        "--fact-batch", type=int, default=MemitConfig.model_fields["fact_batch"].default
    )
    parser.add_argument(
        "--vstar-dtype",
        nargs="+",
        default=["auto"],
        choices=["auto", "float32", "bfloat16"],
        help="one job: v* dtypes compared",
    )
    parser.add_argument("--rome-n", type=int, default=10, help="ROME edits timed for the ratio")
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "modelsurgery"))
    args = parser.parse_args()
    if not (args.memit_n or args.sequential):
        parser.error("give --memit-n N and/or --sequential N")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(describe(device), flush=True)
    torch.manual_seed(0)

    records = json.loads(shared_data_path("counterfact/counterfact-dev.json").read_text())
    n = max(args.memit_n or 0, args.sequential or 0)
    reported = range(args.offset, args.offset + n)
    for dev in DEV_CASES:
        if set(reported) & set(dev):
            print(f"note: reported cases overlap the dev cases {dev.start}-{dev.stop - 1}")
    facts = [Fact.model_validate(records[i]) for i in reported]
    loaded = load("smollm2-135m", device=device)
    model, tok = loaded.model, loaded.tokenizer
    ctx = MethodContext(model_digest=loaded.digest, cache_dir=Path(args.cache_dir), device=device)
    args.ppl_base = wikitext_perplexity(model, tok, max_tokens=args.ppl_tokens)
    rome_s = median_rome_seconds(model, tok, facts[: args.rome_n], ctx)
    print(json.dumps({"median_rome_edit_s": round(rome_s, 3), **peak_memory(device)}), flush=True)
    if args.memit_n:
        one_job(args, model, tok, facts[: args.memit_n], ctx, rome_s, args.ppl_base)
    if args.sequential:
        chained = facts[: args.sequential]
        before = score_facts(model, tok, get_adapter(model), chained)
        rows = []
        for projection in args.projection:
            with tempfile.TemporaryDirectory(prefix="memit-scale-") as root:
                rows.append(chain(args, chained, before, projection, Path(root)))
            print(json.dumps(rows[-1]), flush=True)
        print_ratios(rows)


if __name__ == "__main__":
    main()
