"""The `prune` surgery method: structured (neurons, KV head groups), unstructured and N:M
(optionally refitted, ``pruning.sequential``; optionally with OWL's per-layer ratios).

``prune_model`` does the work on given calibration token ids (what tests call); ``run`` is the
registered entry point: it builds the calibration windows.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
from torch import nn

from modelsurgery.editing.registry import MethodContext, SurgeryResult
from modelsurgery.models.adapters import ArchitectureAdapter, Projection, get_adapter
from modelsurgery.models.hardware import resolve_dtype
from modelsurgery.pruning.calibration import (
    InputStats,
    LayerInputs,
    LayerwiseCalibration,
    calibration_ids,
)
from modelsurgery.pruning.config import DEFAULT_REFIT_INPUTS, PruneConfig
from modelsurgery.pruning.masks import nm_prune_mask, row_prune_mask
from modelsurgery.pruning.metrics import (
    block_projections,
    forward_latency,
    parameter_counts,
    sparsity_table,
    weight_shapes,
)
from modelsurgery.pruning.owl import measure_outliers, owl_ratios
from modelsurgery.pruning.refit import Sparsity
from modelsurgery.pruning.resize import (
    KV_HEADS_KEY,
    MLP_WIDTHS_KEY,
    module_tensors,
    remove_kv_groups,
    remove_mlp_neurons,
    replace,
    with_bias,
)
from modelsurgery.pruning.scores import magnitude_scores, ria_scores, wanda_scores
from modelsurgery.pruning.sequential import refit_layer
from modelsurgery.pruning.structured import (
    compensation_bias,
    kv_group_scores,
    neuron_scores,
    top_indices,
)


class _Pruner:
    """Per-layer pruning steps for one model and config; accumulates changed tensors."""

    def __init__(self, adapter: ArchitectureAdapter, config: PruneConfig, context: MethodContext):
        self.adapter = adapter
        self.config = config
        self.refit = config.kind != "structured" and config.refit == "sparsegpt"
        self.context = context
        self.changed: dict[str, torch.Tensor] = {}
        self.mlp_widths = [adapter.intermediate_size] * adapter.num_layers
        self.kv_heads = [adapter.num_kv_heads] * adapter.num_layers
        self.compensate = config.kind == "structured" and config.bias_compensation
        self.compensated = False
        self.kept: dict[int, dict[str, list[int]]] = {}

    # --- which statistics a layer needs -----------------------------------------------------
    def stat_targets(self, index: int) -> dict[str, nn.Module]:
        cfg, adapter = self.config, self.adapter
        if cfg.kind != "structured":
            if cfg.score == "magnitude" or self.refit:
                return {}
            return block_projections(adapter, [index])
        targets: dict[str, nn.Module] = {}
        if cfg.score != "magnitude" or self.compensate:
            targets["mlp_out"] = adapter.mlp_out(index).module
        if self.remove_groups and cfg.score != "magnitude":
            targets["attn_out"] = adapter.attn_out(index).module
        return targets

    @property
    def remove_groups(self) -> int:
        return self.config.kv_groups_to_remove(self.adapter.num_kv_heads)

    # --- unstructured / N:M ----------------------------------------------------------------
    def sparsify(self, index: int, stats: dict[str, InputStats]) -> None:
        cfg = self.config
        for name, module in block_projections(self.adapter, [index]).items():
            weight = Projection(module, self.adapter.layout.conv1d).weight
            if cfg.score == "magnitude":
                scores = magnitude_scores(weight)
            elif cfg.score == "ria":
                scores = ria_scores(weight, stats[name].l2())
            else:
                scores = wanda_scores(weight, stats[name].l2())
            if cfg.kind == "nm":
                mask = nm_prune_mask(scores, cfg.n, cfg.m)
            else:
                mask = row_prune_mask(scores, cfg.layer_ratio(index))
            with torch.no_grad():
                weight[mask] = 0
            self.changed[f"{name}.weight"] = module.weight.detach()

    def refit_layer(
        self, index: int, calibration: LayerwiseCalibration, inputs: LayerInputs
    ) -> None:
        cfg = self.config
        sparsity = (
            Sparsity(n=cfg.n, m=cfg.m) if cfg.kind == "nm" else Sparsity(cfg.layer_ratio(index))
        )
        modules = block_projections(self.adapter, [index])
        refit_layer(
            calibration,
            index,
            inputs,
            modules,
            sparsity=sparsity,
            score=cfg.score or "wanda",
            damping=cfg.refit_damping,
            refit_inputs=cfg.refit_inputs or DEFAULT_REFIT_INPUTS,
            check_cancelled=self.context.check_cancelled,
        )
        for name, module in modules.items():
            self.changed[f"{name}.weight"] = module.weight.detach()

    # --- structured ------------------------------------------------------------------------
    def ensure_mlp_biases(self) -> None:
        """Give a bias-free MLP (Llama's ``mlp_bias: false``) zero biases in every layer, so
        compensation has somewhere to go and ``mlp_bias: true`` loads the export."""
        adapter = self.adapter
        if not self.compensate or adapter.mlp_out(0).module.bias is not None:
            self.compensated = self.compensate
            return
        if not hasattr(adapter.model.config, "mlp_bias"):
            self.context.progress(
                "bias_compensation skipped: the MLP output projection has no bias and the "
                f"config of {adapter.model_type!r} cannot enable one"
            )
            self.compensate = False
            return
        for i in range(adapter.num_layers):
            paths = [adapter.module_path(i, r) for r in adapter.layout.mlp_in]
            for path in [*paths, adapter.mlp_out_path(i)]:
                module = adapter.model.get_submodule(path)
                out_features = Projection(module, adapter.layout.conv1d).out_features_of()
                zeros = module.weight.new_zeros(out_features)
                new = with_bias(module, zeros)
                replace(adapter.model, path, new, self.context.set_aside)
                self.changed.update(module_tensors(path, new))
        self.compensated = True

    def shrink(self, index: int, stats: dict[str, InputStats]) -> None:
        cfg, adapter = self.config, self.adapter
        size = adapter.mlp_out(index).in_features_of()
        keep_count = size - round(cfg.layer_ratio(index) * size)
        mlp_stats = stats.get("mlp_out")
        scores = neuron_scores(adapter, index, mlp_stats, cfg.score, centered=self.compensate)
        keep = top_indices(scores, keep_count)
        bias_delta = None
        if self.compensate and mlp_stats is not None:
            bias_delta = compensation_bias(adapter.mlp_out(index).weight, mlp_stats, keep)
        self.changed.update(remove_mlp_neurons(adapter, index, keep, self.context.set_aside))
        if bias_delta is not None:
            out = adapter.mlp_out(index).module
            with torch.no_grad():
                out.bias += bias_delta.to(out.bias.dtype)
        self.mlp_widths[index] = keep_count
        self.kept[index] = {"mlp_neurons": keep.tolist()}
        if self.remove_groups:
            group_scores = kv_group_scores(adapter, index, stats.get("attn_out"), cfg.score)
            kept_groups = top_indices(group_scores, adapter.num_kv_heads - self.remove_groups)
            kept = kept_groups.tolist()
            self.changed.update(remove_kv_groups(adapter, index, kept, self.context.set_aside))
            self.kv_heads[index] = int(kept_groups.numel())
            self.kept[index]["kv_heads"] = kept

    def config_overrides(self) -> dict[str, Any]:
        adapter, cfg = self.adapter, self.config
        if cfg.kind != "structured":
            return {}
        overrides: dict[str, Any] = {}
        if self.compensated and hasattr(adapter.model.config, "mlp_bias"):
            overrides["mlp_bias"] = True
        if len(set(self.mlp_widths)) == 1:
            overrides[adapter.layout.intermediate_key] = self.mlp_widths[0]
        else:
            overrides[MLP_WIDTHS_KEY] = list(self.mlp_widths)
        if self.remove_groups:
            if len(set(self.kv_heads)) == 1:
                group = adapter.num_heads // adapter.num_kv_heads
                overrides["num_key_value_heads"] = self.kv_heads[0]
                overrides["num_attention_heads"] = self.kv_heads[0] * group
                overrides["head_dim"] = adapter.head_dim
            else:
                overrides[KV_HEADS_KEY] = list(self.kv_heads)
        return overrides


def prune_model(
    model: nn.Module, config: PruneConfig, ids: torch.Tensor, context: MethodContext
) -> SurgeryResult:
    """Prune ``model`` in place from calibration windows ``ids`` ([n, seqlen] token ids)."""
    config = config.with_defaults()
    adapter = get_adapter(model)
    selected = config.selected_layers(adapter.num_layers)
    params_before, bytes_before = parameter_counts(model)
    shapes_before = weight_shapes(block_projections(adapter, selected))
    measure = config.kind == "structured" and config.measure_latency
    latency_ids = ids[:1]
    latency_before = forward_latency(model, latency_ids) if measure else None

    start = time.perf_counter()
    calibration_dtype = resolve_dtype(config.calibration_dtype, next(model.parameters()).device)
    calibration = LayerwiseCalibration(
        model,
        adapter,
        ids,
        batch_size=config.calibration_batch_size,
        dtype=calibration_dtype,
    )
    resolved: dict[str, Any] = {"score": config.score, "refit": config.refit}
    if config.refit_inputs is not None:
        resolved["refit_inputs"] = config.refit_inputs
    artifacts: dict[str, bytes] = {}
    if config.per_layer_ratios == "owl":
        context.progress("measuring outlier ratios (OWL)")
        outliers = measure_outliers(
            calibration, selected, config.owl_threshold, context.check_cancelled
        )
        ratios = owl_ratios(outliers, config.ratio, config.owl_lambda)
        config = config.model_copy(update={"per_layer_ratios": ratios, "layers": selected})
        resolved["per_layer_ratios"] = ratios
        owl = {"rule": "owl", "outlier_ratio": outliers, "ratio": ratios}
        artifacts["layer_ratios.json"] = json.dumps(owl, indent=1).encode()
    pruner = _Pruner(adapter, config, context)
    pruner.ensure_mlp_biases()
    needs_data = pruner.refit or any(pruner.stat_targets(i) for i in selected)
    inputs = calibration.capture() if needs_data else None
    for index in range(max(selected) + 1):
        context.check_cancelled()
        if index in selected:
            targets = pruner.stat_targets(index)
            structured = config.kind == "structured"
            stats = (
                calibration.collect(index, inputs, targets, first_moments=structured)
                if targets and inputs is not None
                else {}
            )
            if structured:
                pruner.shrink(index, stats)
            elif pruner.refit and inputs is not None:
                pruner.refit_layer(index, calibration, inputs)
            else:
                pruner.sparsify(index, stats)
            context.progress(f"pruned layer {index}", step=index + 1, total=max(selected) + 1)
        if inputs is not None and index < max(selected):
            inputs = calibration.run_layer(index, inputs)
    del inputs
    seconds = time.perf_counter() - start

    overrides = pruner.config_overrides()
    for key, value in overrides.items():
        setattr(model.config, key, value)
    params_after, bytes_after = parameter_counts(model)
    sparsity, table = sparsity_table(shapes_before, model)
    metrics: dict[str, float] = {
        "parameters_before": float(params_before),
        "parameters_after": float(params_after),
        "parameter_ratio": params_after / params_before,
        "bytes_before": float(bytes_before),
        "bytes_after": float(bytes_after),
        "sparsity": sparsity,
        "prune_seconds": seconds,
    }
    if config.kind == "structured":
        metrics["bias_compensation"] = float(pruner.compensated)
    if latency_before is not None:
        latency_after = forward_latency(model, latency_ids)
        metrics["latency_before_s"] = latency_before
        metrics["latency_after_s"] = latency_after
        metrics["latency_ratio"] = latency_after / latency_before
    artifacts["layer_sparsity.json"] = json.dumps(table, indent=1).encode()
    if pruner.kept:
        artifacts["kept_structure.json"] = json.dumps(pruner.kept).encode()
    return SurgeryResult(
        changed=pruner.changed,
        config_overrides=overrides,
        metrics=metrics,
        artifacts=artifacts,
        resolved={**resolved, "calibration_dtype": str(calibration_dtype).removeprefix("torch.")},
    )


def run(
    model: nn.Module, tokenizer: Any, config: PruneConfig, context: MethodContext
) -> SurgeryResult:
    """Registered entry point: calibration windows from the tokenizer."""
    ids = calibration_ids(
        tokenizer,
        samples=config.calibration_samples,
        seqlen=config.calibration_seqlen,
        seed=config.seed,
        data=config.calibration_data,
        data_roots=context.data_roots,
    )
    return prune_model(model, config, ids, context)
