"""Second-moment statistics C = E[k k^T] of an MLP down-projection's inputs (the "keys").

Computed once per (key digest, layer, calibration settings) on WikiText-2 validation windows
and cached on disk under ``cache_dir/mom2/<key digest>/``. The key digest covers only the
tensors a layer's keys depend on: everything upstream of that layer's MLP output projection (the
embedding, the layers below, the layer's own attention, norms and MLP input projections), not
the projection itself, the layers above or the head. An edit of the projection (ROME, MEMIT)
leaves it unchanged, so a chain of edits computes the statistics once, as ROME and EasyEdit use
the pretrained model's statistics for every sequential edit. Only the layers up to the deepest
requested one run (the forward is stopped there). A file lock keeps two workers from computing
the same statistics at once; files are written to a temporary name and renamed, so a reader
never sees half a file.
"""

from __future__ import annotations

import functools
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file
from torch import nn

from modelsurgery.editing.data import calibration_windows
from modelsurgery.editing.registry import MethodContext
from modelsurgery.models.adapters import ArchitectureAdapter
from modelsurgery.models.digest import digest_from_hashes, persistent_state_dict, tensor_sha256

from .runner import capture_input, run_until_stopped


@dataclass(frozen=True)
class StatsSettings:
    """Which calibration text the statistics come from (part of the cache key)."""

    samples: int = 256
    window: int = 256
    seed: int = 0
    batch_size: int = 8

    def tag(self) -> str:
        return f"wikitext2-valid.n{self.samples}.w{self.window}.s{self.seed}"


def stats_path(cache_dir: Path, digest: str, module_path: str, settings: StatsSettings) -> Path:
    return cache_dir / "mom2" / digest / f"{module_path}.{settings.tag()}.safetensors"


def key_digest(adapter: ArchitectureAdapter, tensor_hashes: dict[str, str], layer: int) -> str:
    """Digest of the tensors layer ``layer``'s keys (its MLP output projection's inputs) are
    computed from, out of the model's per-tensor hashes."""
    layers_prefix = f"{adapter.layout.layers}."
    projection = f"{adapter.mlp_out_path(layer)}."
    after = tuple(
        f"{path}." for path in (adapter.layout.final_norm, adapter.layout.lm_head) if path
    ) + ((f"{adapter.layout.project_out}.",) if adapter.layout.project_out else ())

    def upstream(name: str) -> bool:
        if name.startswith(layers_prefix):
            index = int(name[len(layers_prefix) :].split(".", 1)[0])
            return index < layer or (index == layer and not name.startswith(projection))
        return not name.startswith(after)

    return digest_from_hashes({n: h for n, h in tensor_hashes.items() if upstream(n)})


@dataclass(frozen=True)
class LayerStatistics:
    """One layer's C with what identifies it: the key digest it is cached under and the
    calibration settings (recorded in the manifest), and the cache file (what derived caches,
    such as the eigendecomposition, sit beside)."""

    layer: int
    held: torch.Tensor | None  # C itself, or None: read from ``path`` on each use
    key_digest: str
    settings: StatsSettings
    path: Path

    @property
    def mom2(self) -> torch.Tensor:
        """C [in, in] float64. Read through the cache file's memory map on each use unless
        held: a job with several layers' statistics (MEMIT: 7 x 0.25 GB at in = 5,632) keeps
        in memory only the one it is solving with."""
        return self.held if self.held is not None else load_file(str(self.path))["mom2"]

    def record(self) -> dict[str, Any]:
        """Which statistics an edit used, for the version's operation config."""
        s = self.settings
        return {
            "key_digest": self.key_digest,
            "samples": s.samples,
            "window": s.window,
            "seed": s.seed,
        }


def second_moments(
    model: nn.Module,
    tokenizer: Any,
    adapter: ArchitectureAdapter,
    layers: list[int],
    context: MethodContext,
    settings: StatsSettings,
) -> dict[int, torch.Tensor]:
    """C (float64, [in, in]) for each layer's down projection, from cache or computed."""
    found = layer_statistics(model, tokenizer, adapter, layers, context, settings)
    return {layer: stats.mom2 for layer, stats in found.items()}


def layer_statistics(
    model: nn.Module,
    tokenizer: Any,
    adapter: ArchitectureAdapter,
    layers: list[int],
    context: MethodContext,
    settings: StatsSettings,
) -> dict[int, LayerStatistics]:
    """Each layer's statistics, from cache or computed; the progress events name each layer's
    key digest (which statistics the edit used)."""
    # Hash every tensor once; each layer's key digest is a subset of these.
    hashes = {name: tensor_sha256(t) for name, t in persistent_state_dict(model).items()}
    digests = {layer: key_digest(adapter, hashes, layer) for layer in layers}
    paths = {
        layer: stats_path(context.cache_dir, digests[layer], adapter.mlp_out_path(layer), settings)
        for layer in layers
    }
    lock_path = context.cache_dir / "mom2" / ".lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_path)):
        missing = [layer for layer in layers if not paths[layer].exists()]
        if missing:
            computed = _compute(model, tokenizer, adapter, missing, context, settings)
            for layer in missing:
                moment, count = computed.pop(layer)
                paths[layer].parent.mkdir(parents=True, exist_ok=True)
                # Stored in float64 (the solves' precision), one layer's copy at a time.
                save_atomically(
                    paths[layer], {"mom2": moment.double(), "count": torch.tensor([count])}
                )
                del moment
        hits = [layer for layer in layers if layer not in missing]
        if hits:
            context.progress("second-moment statistics: cache hit", layers=hits)
        context.progress(
            "second-moment statistics: used",
            statistics={str(layer): digests[layer] for layer in layers},
            calibration=settings.tag(),
        )
        return {
            layer: LayerStatistics(layer, None, digests[layer], settings, paths[layer])
            for layer in layers
        }


def save_atomically(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a safetensors file under a temporary name, fsync, rename: readers never see half."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp))
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    tmp.replace(path)


@torch.no_grad()
def _compute(
    model: nn.Module,
    tokenizer: Any,
    adapter: ArchitectureAdapter,
    layers: list[int],
    context: MethodContext,
    settings: StatsSettings,
) -> dict[int, tuple[torch.Tensor, int]]:
    windows = calibration_windows(tokenizer, settings.samples, settings.window, seed=settings.seed)
    device = next(model.parameters()).device
    width = adapter.intermediate_size
    # Each layer's keys go into its sum as the forward passes it (the sum's own memory, in
    # place), so a batch holds one layer's keys at a time, not every edited layer's. The sums
    # are float32, as in the MEMIT reference's layer statistics: half the memory of float64
    # while the calibration forwards run (7 x 0.13 GB at in = 5,632 for MEMIT), and a float32
    # GEMM per batch; a sum of n_batches positive semi-definite terms loses about 1e-6 relative.
    sums = {layer: torch.zeros(width, width, dtype=torch.float32) for layer in layers}

    def accumulate(layer: int, keys: torch.Tensor) -> None:
        flat = keys.reshape(-1, width).float().cpu()  # (tokens, width)
        sums[layer].addmm_(flat.T, flat)

    count = 0
    deepest = max(layers)
    total = (len(windows) + settings.batch_size - 1) // settings.batch_size
    context.progress("second-moment statistics: computing", layers=layers, step=0, total=total)
    for step, start in enumerate(range(0, len(windows), settings.batch_size), start=1):
        context.check_cancelled()
        batch = windows[start : start + settings.batch_size].to(device)
        with ExitStack() as stack:
            for layer in layers:
                stack.enter_context(
                    capture_input(
                        adapter.mlp_out(layer).module,
                        functools.partial(accumulate, layer),
                        stop=layer == deepest,
                    )
                )
            run_until_stopped(model, batch, torch.ones_like(batch))
        count += batch.numel()
        context.progress("second-moment statistics: computing", step=step, total=total)
    return {layer: (sums[layer].div_(count), count) for layer in layers}
