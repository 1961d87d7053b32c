"""How long one layer's second-moment statistics take (the figure behind the EasyEdit
``mom2_n_samples`` warning): C = E[k k^T] at ROME's layer of SmolLM2-135M from ``--samples``
WikiText-2 validation windows of ``--window`` tokens, computed fresh (empty cache).

    python benchmarks/stats_time.py --samples 64

Prints the device, threads, wall seconds and seconds per window, and the time the default
(256 windows) and EasyEdit's 100,000 would take at that rate.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from modelsurgery.editing.knowledge.config import depth_layer, family_defaults, layer_count
from modelsurgery.editing.knowledge.stats import StatsSettings, second_moments
from modelsurgery.editing.registry import MethodContext
from modelsurgery.models import load
from modelsurgery.models.adapters import get_adapter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--window", type=int, default=256)
    args = parser.parse_args()
    loaded = load("smollm2-135m")
    model = loaded.model.eval()
    config = model.config
    layer = depth_layer(family_defaults(config.model_type).rome_layer, layer_count(config))
    settings = StatsSettings(samples=args.samples, window=args.window)
    with tempfile.TemporaryDirectory() as cache:
        context = MethodContext(model_digest="bench", cache_dir=Path(cache))
        started = time.perf_counter()
        second_moments(model, loaded.tokenizer, get_adapter(model), [layer], context, settings)
        seconds = time.perf_counter() - started
    per_window = seconds / args.samples
    print(f"device cpu, torch threads {torch.get_num_threads()}, layer {layer}")
    print("| windows | window | seconds | s/window | default 256 | 100,000 |")
    print(
        f"| {args.samples} | {args.window} | {seconds:.1f} | {per_window:.3f} | "
        f"{per_window * 256:.1f} s | {per_window * 100_000 / 3600:.1f} h |"
    )


if __name__ == "__main__":
    main()
