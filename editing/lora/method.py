"""``run`` of the ``lora`` method: train a peft LoRA adapter on the frozen model, then merge it
into the weights (changed tensors) or keep it as a peft adapter (artifacts)."""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, PeftModel
from torch import nn

from modelsurgery.editing.knowledge import tokens as tk
from modelsurgery.editing.lora.adapter import adapter_artifacts
from modelsurgery.editing.lora.config import LoraEditConfig
from modelsurgery.editing.lora.data import training_data
from modelsurgery.editing.lora.frozen import frozen_in
from modelsurgery.editing.lora.targets import default_targets, projection_leaves, target_paths
from modelsurgery.editing.lora.train import TrainSettings, mean_nll, train
from modelsurgery.editing.registry import MethodContext, SurgeryResult
from modelsurgery.models.adapters import get_adapter
from modelsurgery.models.hardware import resolve_dtype


def peft_config(model: nn.Module, config: LoraEditConfig, paths: list[str]) -> LoraConfig:
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.setting("alpha"),
        lora_dropout=config.setting("dropout"),
        target_modules=paths,
        fan_in_fan_out=get_adapter(model).layout.conv1d,
        bias="none",
    )


def run(
    model: nn.Module, tokenizer: Any, config: LoraEditConfig, context: MethodContext
) -> SurgeryResult:
    modules, layers = config.target_modules, config.layers
    resolved: dict[str, Any] = {}
    if config.objective == "facts":
        default_modules, default_layers = default_targets(model)
        if modules is None:
            modules = resolved["target_modules"] = default_modules
        if layers is None:
            layers = resolved["layers"] = default_layers
    if modules is None:
        modules = resolved["target_modules"] = projection_leaves(model)
    paths = target_paths(model, modules, layers)
    data = training_data(config, tokenizer, context.data_roots)
    train_dtype = resolve_dtype(config.train_dtype, context.device)
    settings = TrainSettings(
        epochs=config.setting("epochs"),
        lr=config.setting("lr"),
        batch_size=config.setting("batch_size"),
        weight_decay=config.weight_decay,
        kl_factor=config.setting("kl_factor") if config.objective == "facts" else 0.0,
        seed=config.seed,
        pad_id=tk.pad_id_of(tokenizer),
        autocast=None if train_dtype == torch.float32 else train_dtype,
    )
    metrics: dict[str, float] = {}
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    # The adapter's init (A ~ kaiming, B = 0) and dropout draw from a seeded RNG of their own.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        peft_model = PeftModel(model, peft_config(model, config, paths))
        try:
            with frozen_in(model, settings.autocast, context.set_aside):
                metrics["initial_loss"] = mean_nll(model, data.items, settings)
                stats = train(model, data, settings, context)
                metrics["final_loss"] = mean_nll(model, data.items, settings)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            artifacts: dict[str, bytes] = {}
            if config.merge:
                peft_model.merge_and_unload(safe_merge=True)
            else:
                artifacts = adapter_artifacts(peft_model)
                peft_model.unload()
        except BaseException:
            peft_model.unload()
            raise
        finally:
            for name, p in model.named_parameters():
                p.requires_grad_(requires_grad.get(name, False))
    metrics.update(
        trainable_parameters=float(trainable),
        train_steps=float(stats.steps),
        train_seconds=stats.seconds,
    )
    changed = {}
    if config.merge:
        changed = {f"{path}.weight": model.get_submodule(path).weight.detach() for path in paths}
    return SurgeryResult(
        changed=changed,
        metrics=metrics,
        artifacts=artifacts,
        suite=config.suite(),
        resolved={
            **resolved,
            **config.resolved_settings(),
            "train_dtype": str(train_dtype).removeprefix("torch."),
        },
    )
