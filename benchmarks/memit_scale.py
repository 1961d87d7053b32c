"""Knowledge editing at scale on SmolLM2-135M (CounterFact dev): thousands of facts in one job
(``memit`` with its defaults, ``memit`` with ``targets: optimised``, ``ultraedit``, side by side
in one run), and sequential editing (a chain of jobs, each on the previous version).

    python benchmarks/memit_scale.py --memit-n 1000 --offset 2000
    python benchmarks/memit_scale.py --memit-n 10000 --offset 0 --settings memit ultraedit \\
        --score-n 500
    python benchmarks/memit_scale.py --memit-n 200 --offset 1000 --set target_anchor=2
    python benchmarks/memit_scale.py --memit-n 100 --offset 2000 --settings memit \\
        --variant '{"stop_when_most_probable": true}'
    python benchmarks/memit_scale.py --sequential 100 --per-job 10 --projection auto
    python benchmarks/memit_scale.py --sequential 100 --per-job 1 --method rome

Reported facts are CounterFact dev cases from ``--offset`` (default 0); the defaults were chosen on
cases 1000-1199, 2000-2099, 6000-6199, 8000-8299 and 9000-9099 (``DEV_CASES``;
``benchmarks/memit_sweep.py``, this script with ``--set``), and the run says when the reported
cases overlap them. One job: efficacy / paraphrase / locality / neighbourhood score against the
unedited model (``--score-n N``: read on N of the job's facts, spread over its held-out cases),
WikiText-2 perplexity ratio, job seconds (``job_seconds``: the operation's ``run``, statistics
cached before timing), seconds per fact, and that time over the median ``job_seconds`` of
``--one-fact-n`` single-fact ``memit`` jobs with the defaults on the fresh base
(``over_one_fact_job``); peak RSS (and peak CUDA memory). ``--set FIELD=VALUE`` overrides a
``memit`` field for every memit setting (dev sweeps). Sequential: the chain runs through
``execute_job`` on a real store (the product's path: each job reads its base's preserved keys),
then the final version is scored on all facts and perplexity against the root. Prints the
device, one JSON line per setting, then each setting's figures over the first setting's.
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
from modelsurgery.editing.ultraedit import UltraEditConfig
from modelsurgery.editing.ultraedit.method import run as ultraedit_run
from modelsurgery.evaluation.facts import fact_figures, score_facts
from modelsurgery.evaluation.perplexity import wikitext_perplexity
from modelsurgery.models import load
from modelsurgery.models.adapters import get_adapter
from modelsurgery.models.hardware import describe
from modelsurgery.models.placement import Placement
from modelsurgery.server.executor import WorkerSettings, execute_job
from modelsurgery.server.model_cache import ModelCache

DEV_CASES = (
    range(1000, 1200),
    range(2000, 2100),
    range(6000, 6200),
    range(8000, 8300),
    range(9000, 9100),
)
QUIET = {"evaluate": False, "evaluate_perplexity": False}


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak resident set of this process so far (Linux: KiB), and peak CUDA memory."""
    peaks = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        peaks["peak_cuda_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return peaks


def restoring(model, layers: list[int]):
    """A function that puts the down projections of ``layers`` back as they are now."""
    adapter = get_adapter(model)
    saved = {layer: adapter.mlp_out(layer).weight.detach().clone() for layer in layers}

    def restore() -> None:
        with torch.no_grad():
            for layer, weight in saved.items():
                adapter.mlp_out(layer).weight.copy_(weight)

    return restore


def one_fact_job_seconds(model, tok, facts: list[Fact], ctx: MethodContext) -> float:
    """Median seconds of single-fact ``memit`` jobs with the defaults, each on the fresh base
    (statistics cached before the first is timed); NaN with no facts (``--one-fact-n 0``)."""
    if not facts:
        return float("nan")
    first = MemitConfig(facts=facts[:1], **QUIET).resolved(model.config)
    layer_statistics(model, tok, get_adapter(model), first.layers, ctx, first.stats_settings())
    restore = restoring(model, first.layers)
    seconds = []
    for fact in facts:
        config = MemitConfig(facts=[fact], **QUIET).resolved(model.config)
        start = time.perf_counter()
        memit_run(model, tok, config, ctx)
        seconds.append(time.perf_counter() - start)
        restore()
    return statistics.median(seconds)


def setting_config(name: str, facts: list[Fact], model_config, overrides: dict[str, Any]):
    if name == "ultraedit":
        return UltraEditConfig(facts=facts, **QUIET).resolved(model_config)
    extra = {"targets": "optimised"} if name == "optimised" else {}
    if name.startswith("memit:"):
        extra = json.loads(name.removeprefix("memit:"))
    return MemitConfig(facts=facts, **QUIET, **extra, **overrides).resolved(model_config)


def held_out(cases: range) -> list[int]:
    """Positions in ``cases`` of the cases no dev range holds."""
    return [i for i, case in enumerate(cases) if not any(case in dev for dev in DEV_CASES)]


def scored_positions(cases: range, n: int) -> list[int]:
    """Positions of the job's facts the figures are read on: all of them, or ``n`` spread evenly
    over its held-out cases (each scoring reads 6 teacher-forced sequences per CounterFact fact,
    twice per setting: for 10,000 facts on a CPU that takes longer than an ``ultraedit`` job)."""
    if not n or n >= len(cases):
        return list(range(len(cases)))
    kept = held_out(cases)
    return [kept[i * len(kept) // n] for i in range(n)]


def one_job(args, model, tok, cases: range, ctx, one_fact_s: float, ppl_base: float) -> None:
    facts = args.facts[: len(cases)]
    scored = scored_positions(cases, args.score_n)
    sample = [facts[i] for i in scored]
    adapter = get_adapter(model)
    configs = [setting_config(n, facts, model.config, args.overrides) for n in args.settings]
    layers = sorted({layer for config in configs for layer in config.layers})
    for config in configs:
        if isinstance(config, MemitConfig):
            layer_statistics(model, tok, adapter, config.layers, ctx, config.stats_settings())
    restore = restoring(model, layers)
    before = score_facts(model, tok, adapter, sample, neighbourhood=True)
    rows = []
    for name, config in zip(args.settings, configs, strict=True):
        run = ultraedit_run if name == "ultraedit" else memit_run
        start = time.perf_counter()
        result = run(model, tok, config, ctx)
        seconds = time.perf_counter() - start
        after = score_facts(model, tok, adapter, sample, neighbourhood=True)
        metrics = fact_figures(after, before=before)
        ppl = wikitext_perplexity(model, tok, max_tokens=args.ppl_tokens)
        row = {
            "setting": f"{name}-{len(facts)}",
            "layers": f"{config.layers[0]}-{config.layers[-1]}",
            "scored_facts": len(sample),
            **{k: round(v, 4) for k, v in metrics.items()},
            "perplexity_ratio": round(ppl / ppl_base, 4),
            "job_seconds": round(seconds, 1),
            "seconds_per_fact": round(seconds / len(facts), 4),
            "over_one_fact_job": round(seconds / one_fact_s, 2),
            "second_pass_facts": result.metrics.get("second_pass_facts"),
            **{k: round(v, 2) for k, v in peak_memory(ctx.device).items()},
        }
        held = set(held_out(cases))
        kept = [j for j, i in enumerate(scored) if i in held]
        if 0 < len(kept) < len(sample):
            figures = fact_figures([after[i] for i in kept], before=[before[i] for i in kept])
            row["held_out"] = {"cases": len(kept), **{k: round(v, 4) for k, v in figures.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        restore()
    print_ratios(rows)


def chain(args, facts: list[Fact], before: list, projection: str, root: Path) -> dict[str, Any]:
    """``len(facts) / per_job`` jobs, each on the previous one's version, through the
    executor and a real store; returns the final version's figures."""
    store = CheckpointStore(root / "store")
    settings = WorkerSettings(
        store_root=root / "store",
        cache_dir=Path(args.cache_dir),
        placement=Placement(devices=(args.device,)),
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
        label = {k: row[k] for k in ("setting", "projection") if k in row}
        print(json.dumps({**label, "over": {k: first[k] for k in label}, **ratios}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memit-n", type=int, help="facts in one MEMIT job (1000, 10000)")
    parser.add_argument("--sequential", type=int, help="facts written as a chain of jobs")
    parser.add_argument("--per-job", type=int, default=10, help="facts per job of the chain")
    parser.add_argument("--method", choices=["memit", "rome"], default="memit", help="chain")
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=["memit", "optimised", "ultraedit"],
        default=["memit", "optimised", "ultraedit"],
        help="one job: memit defaults, memit with targets: optimised, ultraedit",
    )
    parser.add_argument(
        "--set", nargs="*", default=[], help="one job: FIELD=VALUE memit overrides (JSON values)"
    )
    parser.add_argument(
        "--variant",
        nargs="*",
        default=[],
        help="one job: more memit settings side by side, each a JSON object of fields "
        "('{\"stop_when_most_probable\": true}')",
    )
    parser.add_argument(
        "--projection",
        nargs="+",
        choices=["none", "null_space", "auto"],
        default=["auto"],
        help="sequential: settings compared side by side",
    )
    parser.add_argument("--offset", type=int, default=0, help="first reported case")
    parser.add_argument("--one-fact-n", type=int, default=3, help="1-fact memit jobs timed")
    parser.add_argument(
        "--score-n",
        type=int,
        default=0,
        help="one job: facts scored, spread over the held-out cases (0 = every fact of the job)",
    )
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "modelsurgery"))
    args = parser.parse_args()
    args.overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    args.settings += [f"memit:{json.dumps(json.loads(v))}" for v in args.variant]
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
    if args.memit_n:
        one_fact_s = one_fact_job_seconds(model, tok, facts[: args.one_fact_n], ctx)
        print(json.dumps({"one_fact_memit_job_seconds": round(one_fact_s, 2)}), flush=True)
        args.facts = facts
        one_job(args, model, tok, reported[: args.memit_n], ctx, one_fact_s, args.ppl_base)
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
