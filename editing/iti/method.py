"""``run`` of the ``iti`` method: read every head on the contrast texts, probe, choose the
top-k heads, and bake their shifts into the attention output projection's bias."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelsurgery.editing.contrast import head_inputs, load_text_pairs
from modelsurgery.editing.data import resolve_data_file, split_indices
from modelsurgery.editing.iti.config import ItiConfig
from modelsurgery.editing.iti.probes import (
    DirectionKind,
    ProbeFit,
    fit_probes,
    head_shifts,
    mass_mean_directions,
    rank_heads,
)
from modelsurgery.editing.iti.records import (
    QARecord,
    labelled_texts,
    mc_accuracy,
    read_records_jsonl,
)
from modelsurgery.editing.mask_heads import format_head
from modelsurgery.editing.registry import MethodContext, SurgeryResult
from modelsurgery.models.adapters import get_adapter
from modelsurgery.models.output_bias import enable_output_bias

HEADS_ARTIFACT = "iti_heads.json"
# Texts per head_inputs call: the job can be cancelled and reports progress between chunks.
_CHUNK_BATCHES = 8


@dataclass(frozen=True)
class ContrastSet:
    """Labelled texts (1 = true / positive) split by pair or record into fit and held-out
    text indices; ``held_records`` are the held-out records (empty for a pairs source)."""

    texts: list[str]
    labels: torch.Tensor  # (N,)
    fit: list[int]
    held: list[int]
    held_records: list[QARecord]


def load_records(config: ItiConfig, context: MethodContext) -> list[QARecord]:
    if config.records is not None:
        return list(config.records)
    assert config.records_file is not None
    path = resolve_data_file(config.records_file, context.data_roots, "records_file")
    return read_records_jsonl(path)


def load_contrast(config: ItiConfig, context: MethodContext) -> ContrastSet:
    """The config's texts and their seeded split (``probe_holdout_fraction``, ``seed``)."""
    if config.uses_records():
        records = load_records(config, context)
        texts, labels, owners = labelled_texts(records)
        _, held_records = split_indices(len(records), config.probe_holdout_fraction, config.seed)
        held_set = set(held_records)
        return ContrastSet(
            texts=texts,
            labels=torch.tensor(labels),
            fit=[i for i, owner in enumerate(owners) if owner not in held_set],
            held=[i for i, owner in enumerate(owners) if owner in held_set],
            held_records=[records[i] for i in held_records],
        )
    pairs = load_text_pairs(config.pairs_source(), context.data_roots)
    if len(pairs) < 3:
        field = "pairs" if config.pairs is not None else "pairs_file"
        raise ValueError(f"{field}: at least 3 pairs are needed (2 to fit, 1 held out)")
    fit_pairs, held_pairs = split_indices(len(pairs), config.probe_holdout_fraction, config.seed)
    return ContrastSet(
        texts=[text for p in pairs for text in (p.positive, p.negative)],
        labels=torch.tensor([1, 0] * len(pairs)),
        fit=[2 * i + side for i in fit_pairs for side in (0, 1)],
        held=[2 * i + side for i in held_pairs for side in (0, 1)],
        held_records=[],
    )


def collect_heads(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    layers: list[int],
    config: ItiConfig,
    context: MethodContext,
) -> torch.Tensor:
    """Every probed head's output before the attention output projection: (N, L, heads, D)."""
    chunk = config.batch_size * _CHUNK_BATCHES
    parts = []
    for start in range(0, len(texts), chunk):
        context.check_cancelled()
        context.progress("head activations", step=start, total=len(texts))
        parts.append(
            head_inputs(
                model,
                tokenizer,
                texts[start : start + chunk],
                layers,
                token=config.token,
                batch_size=config.batch_size,
            )
        )
    return torch.cat(parts)


@dataclass(frozen=True)
class HeadFit:
    """Probes of every probed head and each head's shift for alpha = 1 (its norm is sigma):
    both flattened over S = layers * heads, row ``l * heads + h`` for ``layers[l]``."""

    probes: ProbeFit
    unit_shifts: torch.Tensor  # (S, D)


def fit_heads(
    activations: torch.Tensor, contrast: ContrastSet, direction: DirectionKind
) -> HeadFit:
    """activations: (N, L, heads, D) of ``contrast.texts``."""
    flat = activations.flatten(1, 2)  # (N, S, D)
    fit_x, fit_y = flat[contrast.fit], contrast.labels[contrast.fit]
    # 1. One probe per head on the fit texts, scored on the held-out ones.
    probes = fit_probes(fit_x, fit_y, flat[contrast.held], contrast.labels[contrast.held])
    # 2. The direction: mass-mean shift of the fit texts, or the probe's weight.
    directions = mass_mean_directions(fit_x, fit_y) if direction == "mass_mean" else probes.weight
    # 3. Its scale: the fit activations' standard deviation along it.
    return HeadFit(probes, head_shifts(fit_x, directions, 1.0))


def shifts_for(
    fit: HeadFit, heads: list[int], alpha: float, layers: list[int], num_heads: int
) -> dict[tuple[int, int], torch.Tensor]:
    """(layer, head) -> alpha * sigma * unit direction, for flat head indices ``heads``."""
    return {(layers[i // num_heads], i % num_heads): alpha * fit.unit_shifts[i] for i in heads}


@torch.no_grad()
def bake_head_shifts(
    model: nn.Module, shifts: Mapping[tuple[int, int], torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Add each head's shift to its input of the attention output projection, as a bias.

    The projection computes ``W_o z + b`` with z the heads' outputs stacked; ``z_h + s``
    gives ``W_o z + (b + W_o[:, cols(h)] s)``. Returns the changed tensors (with every zero
    bias the family's flag added, which a stored version must hold) and the config overrides.
    """
    added, overrides = enable_output_bias(model, "attn_out")
    adapter = get_adapter(model)
    names = set(added)
    by_layer: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for (layer, head), shift in sorted(shifts.items(), key=lambda item: item[0]):
        by_layer.setdefault(layer, []).append((head, shift))
    for layer, items in sorted(by_layer.items()):
        projection = adapter.attn_out(layer)
        bias = projection.bias
        assert bias is not None, "enable_output_bias gave every layer a bias"
        weight = projection.weight.double()  # (hidden, heads * D)
        delta = sum(
            weight[:, adapter.head_columns(h)] @ s.double().to(weight.device) for h, s in items
        )
        bias += torch.as_tensor(delta).to(bias.dtype)
        names.add(f"{adapter.attn_out_path(layer)}.bias")
    changed = {name: model.get_parameter(name).detach().clone() for name in sorted(names)}
    return changed, overrides


def heads_table(
    config: ItiConfig, fit: HeadFit, chosen: list[int], layers: list[int], num_heads: int
) -> dict[str, Any]:
    accuracy = fit.probes.accuracy.view(len(layers), num_heads)
    sigma = fit.unit_shifts.norm(dim=-1)
    return {
        "layers": layers,
        "num_heads": num_heads,
        "direction": config.direction,
        "alpha": config.alpha,
        "token": config.token,
        "accuracy": [[round(v, 4) for v in row] for row in accuracy.tolist()],
        "chosen": [
            {
                "head": format_head(layers[i // num_heads], i % num_heads),
                "accuracy": round(float(fit.probes.accuracy[i]), 4),
                "sigma": round(float(sigma[i]), 6),
                "shift_norm": round(float(sigma[i]) * config.alpha, 6),
            }
            for i in chosen
        ],
    }


def run(
    model: nn.Module, tokenizer: Any, config: ItiConfig, context: MethodContext
) -> SurgeryResult:
    adapter = get_adapter(model)
    layers = config.layer_indices(adapter.num_layers)
    contrast = load_contrast(config, context)
    metrics: dict[str, float] = {
        "texts_fit": float(len(contrast.fit)),
        "texts_heldout": float(len(contrast.held)),
    }

    if contrast.held_records:
        context.progress("held-out MC1 before")
        metrics["mc1_before"] = mc_accuracy(
            model, tokenizer, contrast.held_records, config.batch_size
        )

    activations = collect_heads(model, tokenizer, contrast.texts, layers, config, context)
    context.progress("probes", heads=len(layers) * adapter.num_heads)
    fit = fit_heads(activations, contrast, config.direction)
    chosen = rank_heads(fit.probes)[: config.top_k]
    shifts = shifts_for(fit, chosen, config.alpha, layers, adapter.num_heads)
    context.check_cancelled()
    context.progress(f"shifting heads {[format_head(*h) for h in shifts]}")
    changed, overrides = bake_head_shifts(model, shifts)

    accuracy = fit.probes.accuracy[chosen]
    metrics["heads_shifted"] = float(len(chosen))
    metrics["probe_accuracy_mean"] = float(accuracy.mean())
    metrics["probe_accuracy_best"] = float(accuracy.max())
    if contrast.held_records:
        context.progress("held-out MC1 after")
        metrics["mc1_after"] = mc_accuracy(
            model, tokenizer, contrast.held_records, config.batch_size
        )
    table = heads_table(config, fit, chosen, layers, adapter.num_heads)
    return SurgeryResult(
        changed=changed,
        config_overrides=overrides,
        metrics=metrics,
        artifacts={HEADS_ARTIFACT: json.dumps(table, indent=1).encode()},
    )
