"""Pruning figures on SmolLM2-135M: WikiText-2 perplexity (first 4,096 test tokens, window 512),
pruning seconds, parameter ratio, file size and forward latency, dense vs each method.

    .venv/bin/python benchmarks/pruning.py [--samples 128] [--seqlen 512] [--only wanda-50 ...]
        [--wanda-checkout PATH]

With ``--wanda-checkout`` (a clone of locuslab/wanda; never vendored here) each Wanda row is
also run through that repository's own ``prune_wanda`` on a copy of the same model with the
same calibration windows, in the same process, so the time ratio is measured side by side.

Peers (same protocol, same kind of machine): dense 30.12; locuslab/wanda reference Wanda 50%
66.6, magnitude 50% 409.8, Wanda 2:4 201.9, magnitude 2:4 1,745.7 (250-750 s per Wanda pass);
Torch-Pruning 20% MLP neurons: activation score 48.6 (1.61x), 0.881x parameters.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import statistics
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from modelsurgery.checkpoints.codecs import choose_encoding, get_codec
from modelsurgery.editing.registry import MethodContext
from modelsurgery.evaluation.perplexity import wikitext_perplexity
from modelsurgery.models import load
from modelsurgery.models.hardware import describe, resolve_dtype
from modelsurgery.pruning.calibration import calibration_ids
from modelsurgery.pruning.config import PruneConfig
from modelsurgery.pruning.prune import prune_model

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
    store_ratio: float | None = None


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


def store_ratio(changed: dict[str, torch.Tensor]) -> float:
    """Bytes the checkpoint store writes for the changed tensors over their dense bytes."""
    stored = sum(len(get_codec(choose_encoding(t)).encode(t)) for t in changed.values())
    dense = sum(t.numel() * t.element_size() for t in changed.values())
    return stored / dense


class _RotaryShim(torch.nn.Module):
    """Gives a decoder layer the rotary ``position_embeddings`` that transformers >= 4.48
    computes at model level, for callers (the Wanda reference) that pass only position ids."""

    def __init__(self, layer: torch.nn.Module, rotary: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.rotary = rotary

    def forward(self, hidden: torch.Tensor, **kwargs: Any) -> Any:
        if kwargs.get("position_embeddings") is None:
            kwargs["position_embeddings"] = self.rotary(hidden, kwargs["position_ids"])
        return self.layer(hidden, **kwargs)


def reference_wanda(
    checkout: Path, model: torch.nn.Module, ids: torch.Tensor, spec: dict[str, Any]
) -> float:
    """Prune ``model`` in place with the checkout's ``lib.prune.prune_wanda`` (its C4 loader
    replaced by ``ids``); returns the wall seconds of that call."""
    if "datasets" not in sys.modules and importlib.util.find_spec("datasets") is None:
        sys.modules["datasets"] = types.ModuleType("datasets")  # lib/data.py imports it
        sys.modules["datasets"].load_dataset = None  # type: ignore[attr-defined]
    sys.path.insert(0, str(checkout))
    prune_lib = importlib.import_module("lib.prune")
    prune_lib.get_loaders = lambda *_a, **_k: ([(row[None], None) for row in ids], None)
    layers = model.model.layers
    for i, layer in enumerate(layers):
        layers[i] = _RotaryShim(layer, model.model.rotary_emb)
    model.seqlen = ids.shape[1]
    model.hf_device_map = {}
    args = types.SimpleNamespace(
        nsamples=ids.shape[0], seed=0, sparsity_ratio=spec.get("ratio", 0.5), use_variant=False
    )
    start = time.perf_counter()
    prune_lib.prune_wanda(
        args, model, None, torch.device("cpu"), prune_n=spec.get("n", 0), prune_m=spec.get("m", 0)
    )
    seconds = time.perf_counter() - start
    for i, shim in enumerate(layers):
        layers[i] = shim.layer
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument(
        "--calibration-dtype", choices=["auto", "float32", "bfloat16"], default="auto"
    )
    parser.add_argument("--only", nargs="*", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--wanda-checkout", type=Path, help="locuslab/wanda clone (side by side)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(describe(), flush=True)

    loaded = load("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
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
            else:
                row.store_ratio = store_ratio(result.changed)
            rows.append(row)
            print(row, flush=True)
            del pruned
            if (
                args.wanda_checkout
                and METHODS[name]["score"] == "wanda"
                and config.kind != "structured"
            ):
                reference = copy.deepcopy(model)
                seconds = reference_wanda(args.wanda_checkout, reference, ids, METHODS[name])
                ref_row = Row(
                    f"{name} (locuslab/wanda)",
                    wikitext_perplexity(reference, tokenizer),
                    seconds,
                    float("nan"),
                    1.0,
                )
                rows.append(ref_row)
                print(ref_row, f"ours/reference time {row.seconds / seconds:.3f}", flush=True)
                del reference

    print(
        f"\nSmolLM2-135M, calibration {args.samples} x {args.seqlen} tokens "
        f"({resolve_dtype(args.calibration_dtype, 'cpu')}), WikiText-2 test first 4096 tokens, "
        "window 512"
    )
    print(f"dense perplexity {dense_ppl:.2f}, safetensors {dense_mb:.1f} MB")
    header = f"{'method':<26}{'ppl':>10}{'ppl/dense':>10}{'seconds':>9}{'cpu s':>9}{'params':>8}"
    print(header + f"{'latency':>9}{'file MB':>9}{'reload diff':>13}   store/dense")
    for r in rows:
        extra = (
            f"{r.latency_ratio:>9.3f}{r.file_mb:>9.1f}{r.reload_max_diff:>13.2e}"
            if r.latency_ratio is not None
            and r.file_mb is not None
            and r.reload_max_diff is not None
            else f"{'':>31}   {r.store_ratio:.3f}"
            if r.store_ratio is not None
            else ""
        )
        print(
            f"{r.name:<26}{r.perplexity:>10.2f}{r.perplexity / dense_ppl:>10.3f}"
            f"{r.seconds:>9.1f}{r.cpu_seconds:>9.1f}{r.parameter_ratio:>8.3f}" + extra
        )
    if not args.wanda_checkout:
        lo, hi = REFERENCE_WANDA_SECONDS
        print(f"reference Wanda pass (peers' measurement, not rerun here): {lo:.0f}-{hi:.0f} s")
    print(
        "seconds = wall clock of the pruning pass; "
        f"cpu s = process CPU time over {torch.get_num_threads()} threads; "
        "store/dense = checkpoint-store bytes of the changed tensors over their dense bytes"
    )


if __name__ == "__main__":
    main()
