"""LoRA on SmolLM2-135M, side by side in one run.

``facts``: ROME and LoRA (constrained fine-tuning) on the same CounterFact dev facts, each on a
fresh copy of the base, all facts in one edit. Printed per method: efficacy, paraphrase,
locality, probability gain, WikiText-2 perplexity ratio and seconds. LoRA runs three ways:
``lora`` (the default: KL on the facts' own locality prompts, so its locality is in-sample),
``lora-disjoint-kl`` (KL on the locality prompts of the next ``--n`` dev facts, disjoint from
the judged ones) and ``lora-no-kl``.

``recovery``: a structured prune and a ``lora`` recovery on WikiText-2 validation text in one
job, as a user submits it (``apply --local`` in a child process with its own home, so the wall
time includes starting Ray and loading). The export is loaded with plain ``from_pretrained``
and its perplexity measured beside the dense model's and the unrecovered prune's (op0's own
figure, same protocol). ``--control`` runs the same ``lora`` on the dense model too: tuning on
WikiText-2 validation text adapts the model to WikiText's domain, which lowers WikiText-2 test
perplexity whatever was pruned, and the control shows how much.

    .venv/bin/python benchmarks/lora.py facts --n 10 --offset 0
    .venv/bin/python benchmarks/lora.py recovery --ratio 0.2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modelsurgery.editing.data import shared_data_path
from modelsurgery.editing.knowledge.facts import Fact
from modelsurgery.editing.registry import MethodContext, get_method
from modelsurgery.evaluation.measure import JobMeasurements
from modelsurgery.evaluation.metrics import FACTS, EvaluationSettings
from modelsurgery.evaluation.perplexity import wikitext_perplexity
from modelsurgery.evaluation.suite import job_protocol
from modelsurgery.models import load
from modelsurgery.models.hardware import describe

FACT_COLUMNS = ("efficacy", "paraphrase", "locality", "probability_gain", "perplexity_ratio")


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs (values as JSON where they parse) for the LoRA config."""
    return {k: parse_value(v) for k, v in (p.split("=", 1) for p in pairs)}


def edit_once(
    loaded: Any, method: str, config: dict[str, Any], facts: list[Fact], ppl_tokens: int
) -> tuple[dict[str, float], float]:
    """One method on a fresh copy of the base; its figures as a job measures an operation's."""
    model = copy.deepcopy(loaded.model)
    protocol = job_protocol(EvaluationSettings(perplexity_tokens=ppl_tokens))
    measurements = JobMeasurements(loaded.tokenizer, protocol)
    measured = frozenset({"perplexity", FACTS})
    measurements.before_operation(0, model, measured, facts)
    registered = get_method(method)
    spec = registered.config_class.model_validate({"method": method, **config})
    context = MethodContext(
        model_digest=loaded.digest, cache_dir=Path.home() / ".cache" / "modelsurgery"
    )
    started = time.perf_counter()
    registered.run(model, loaded.tokenizer, spec, context)
    seconds = time.perf_counter() - started
    return measurements.operation_figures(0, model, measured, facts), seconds


def run_facts(args: argparse.Namespace) -> None:
    records = json.loads(shared_data_path("counterfact/counterfact-dev.json").read_text())
    judged = records[args.offset : args.offset + args.n]
    disjoint = records[args.offset + args.n : args.offset + 2 * args.n]
    facts = [Fact.model_validate(r) for r in judged]
    loaded = load("smollm2-135m")
    quiet = {"evaluate_perplexity": False}
    lora = {"facts": judged, **quiet, **overrides(args.lora)}
    runs = {
        "rome": ("rome", {"facts": judged, "evaluate": False, **quiet}),
        "lora": ("lora", lora),
        "lora-disjoint-kl": (
            "lora",
            {**lora, "kl_prompts": [r["locality_prompt"] for r in disjoint]},
        ),
        "lora-no-kl": ("lora", {**lora, "kl_factor": 0.0}),
    }
    runs = {name: runs[name] for name in args.methods}
    print(f"CounterFact dev cases {args.offset}-{args.offset + args.n - 1}", flush=True)
    print("method".ljust(20) + "".join(c.rjust(18) for c in FACT_COLUMNS) + "seconds".rjust(10))
    for name, (method, config) in runs.items():
        metrics, seconds = edit_once(loaded, method, config, facts, args.ppl_tokens)
        cells = "".join(f"{metrics.get(c, float('nan')):18.3f}" for c in FACT_COLUMNS)
        print(f"{name:20}{cells}{seconds:10.1f}", flush=True)


def apply_local(spec: dict[str, Any], home: Path) -> tuple[dict[str, Any], float]:
    path = home / "spec.json"
    path.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "modelsurgery.client.cli", "apply", str(path)]
    started = time.perf_counter()
    done = subprocess.run(
        [*command, "--local", "--new", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "MODELSURGERY_HOME": str(home)},
        check=False,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"apply exited {done.returncode}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout), wall


def export(version_id: str, home: Path, folder: Path) -> None:
    command = [sys.executable, "-m", "modelsurgery.client.cli", "versions", "export"]
    subprocess.run(
        [*command, version_id, str(folder), "--json"],
        capture_output=True,
        env={**os.environ, "MODELSURGERY_HOME": str(home)},
        check=True,
    )


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_recovery(args: argparse.Namespace) -> None:
    prune = {"method": "prune", "kind": "structured", "ratio": args.ratio}
    lora = {"method": "lora", "text": "wikitext-2/valid.tokens", **overrides(args.lora)}
    spec = {"base": "smollm2-135m", "operations": [prune, lora]}
    print(f"job: {json.dumps(spec)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lora-recovery-") as tmp:
        home = Path(tmp)
        summary, wall = apply_local(spec, home)
        m = summary["metrics"]
        folder = home / "export"
        export(summary["version_id"], home, folder)
        exported = AutoModelForCausalLM.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        dense = load("smollm2-135m").model
        tokens = 4096
        ppl_dense = wikitext_perplexity(dense, tokenizer, max_tokens=tokens)
        ppl_export = wikitext_perplexity(exported, tokenizer, max_tokens=tokens)
        param_ratio = parameters(exported) / parameters(dense)
    print(
        f"wall {wall:.1f} s (job_seconds {m['job_seconds']:.1f}, op0.prune_seconds "
        f"{m['op0.prune_seconds']:.1f}, op1.train_seconds {m['op1.train_seconds']:.1f}, "
        f"op1.train_steps {m['op1.train_steps']:.0f})"
    )
    print(f"perplexity dense {ppl_dense:.3f}, exported (plain from_pretrained) {ppl_export:.3f}")
    print(
        f"perplexity ratio vs dense: pruned, no recovery {m['op0.perplexity_ratio']:.4f}; "
        f"pruned + lora (job's judged perplexity_ratio) {m['perplexity_ratio']:.4f}; "
        f"export {ppl_export / ppl_dense:.4f}"
    )
    print(f"parameter ratio {param_ratio:.4f} (op0.parameter_ratio {m['op0.parameter_ratio']:.4f})")
    if args.control:
        with tempfile.TemporaryDirectory(prefix="lora-control-") as tmp:
            control, wall = apply_local({"base": "smollm2-135m", "operations": [lora]}, Path(tmp))
        print(
            f"control, the same lora on the dense model: perplexity ratio vs dense "
            f"{control['metrics']['perplexity_ratio']:.4f} (wall {wall:.1f} s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["facts", "recovery"])
    parser.add_argument("--n", type=int, default=10, help="facts: CounterFact dev cases")
    parser.add_argument("--offset", type=int, default=0, help="facts: first case index")
    parser.add_argument("--ppl-tokens", type=int, default=2048, help="facts: perplexity tokens")
    parser.add_argument(
        "--methods",
        nargs="*",
        choices=["rome", "lora", "lora-disjoint-kl", "lora-no-kl"],
        default=["rome", "lora", "lora-disjoint-kl", "lora-no-kl"],
        help="facts: what to run (lora: KL on the judged facts' own locality prompts)",
    )
    parser.add_argument("--ratio", type=float, default=0.2, help="recovery: structured ratio")
    parser.add_argument(
        "--control", action="store_true", help="recovery: the same lora job on the dense model"
    )
    parser.add_argument("--lora", nargs="*", default=[], help="lora config key=value")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe(), flush=True)
    run_facts(args) if args.mode == "facts" else run_recovery(args)


if __name__ == "__main__":
    main()
