"""Physical resizing: replace Linear / Conv1D modules by smaller ones holding the kept rows or
columns, so the pruned model really has fewer parameters and a faster forward pass.

All indices are in the [out, in] view of a projection; GPT-2's Conv1D stores [in, out] and is
handled here, nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from modelsurgery.editing.registry import PutBack, keep_aside
from modelsurgery.models.adapters import ArchitectureAdapter

Side = Literal["out", "in"]

MLP_WIDTHS_KEY = "modelsurgery_mlp_widths"
KV_HEADS_KEY = "modelsurgery_kv_heads"

SetAside = Callable[[nn.Parameter], PutBack]


def _is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, Conv1D)


def _new_projection(like: nn.Module, out_features: int, in_features: int, bias: bool) -> nn.Module:
    w = like.weight
    if _is_conv1d(like):
        new = Conv1D(out_features, in_features)
        new.to(device=w.device, dtype=w.dtype)
        if not bias:
            new.bias = None
        return new
    return nn.Linear(in_features, out_features, bias=bias, device=w.device, dtype=w.dtype)


def _out_in(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return (w.shape[1], w.shape[0]) if _is_conv1d(module) else (w.shape[0], w.shape[1])


def select(module: nn.Module, keep: torch.Tensor, side: Side) -> nn.Module:
    """A new projection holding only the ``keep`` outputs (rows) or inputs (columns)."""
    out_f, in_f = _out_in(module)
    keep = keep.to(module.weight.device)
    has_bias = getattr(module, "bias", None) is not None
    new_out, new_in = (keep.numel(), in_f) if side == "out" else (out_f, keep.numel())
    new = _new_projection(module, new_out, new_in, has_bias)
    with torch.no_grad():
        w = module.weight.t() if _is_conv1d(module) else module.weight
        w = w.index_select(0 if side == "out" else 1, keep)
        new.weight.copy_(w.t() if _is_conv1d(module) else w)
        if has_bias:
            b = module.bias.index_select(0, keep) if side == "out" else module.bias
            new.bias.copy_(b)
    return new


def with_bias(module: nn.Module, bias: torch.Tensor) -> nn.Module:
    """The same projection with ``bias`` (length out) as its bias."""
    out_f, in_f = _out_in(module)
    new = _new_projection(module, out_f, in_f, True)
    with torch.no_grad():
        new.weight.copy_(module.weight)
        new.bias.copy_(bias)
    return new


def replace(
    model: nn.Module, path: str, module: nn.Module, set_aside: SetAside = keep_aside
) -> None:
    """Put ``module`` at ``path`` and set the replaced one's parameters aside
    (``MethodContext.set_aside``): on a warm model the job's journal lets go of them at once,
    so pruning layer by layer never holds the full-size layers beside the smaller ones."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    replaced = getattr(parent, name)
    setattr(parent, name, module)
    for parameter in replaced.parameters():
        set_aside(parameter)


def module_tensors(path: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """State-dict entries of one projection, keyed by full name."""
    out = {f"{path}.weight": module.weight.detach()}
    if getattr(module, "bias", None) is not None:
        out[f"{path}.bias"] = module.bias.detach()
    return out


def remove_mlp_neurons(
    adapter: ArchitectureAdapter,
    index: int,
    keep: torch.Tensor,
    set_aside: SetAside = keep_aside,
) -> dict[str, torch.Tensor]:
    """Keep only neurons ``keep`` of layer ``index``'s MLP (rows of every input projection,
    columns of the output projection); the full-size projections are set aside (``replace``).
    Returns the new tensors by state-dict name."""
    model, layout = adapter.model, adapter.layout
    changed: dict[str, torch.Tensor] = {}
    keep = keep.sort().values
    for relative in layout.mlp_in:
        path = adapter.module_path(index, relative)
        new = select(model.get_submodule(path), keep, "out")
        replace(model, path, new, set_aside)
        changed.update(module_tensors(path, new))
    path = adapter.mlp_out_path(index)
    new = select(model.get_submodule(path), keep, "in")
    replace(model, path, new, set_aside)
    changed.update(module_tensors(path, new))
    mlp = model.get_submodule(path.rpartition(".")[0])
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = int(keep.numel())
    return changed


def head_rows(heads: Sequence[int], head_dim: int, device: torch.device) -> torch.Tensor:
    """Row (or column) indices of whole heads in a [heads * head_dim] axis."""
    base = torch.arange(head_dim, device=device)
    return torch.cat([base + h * head_dim for h in heads]) if heads else base[:0]


def remove_kv_groups(
    adapter: ArchitectureAdapter,
    index: int,
    keep_groups: Sequence[int],
    set_aside: SetAside = keep_aside,
) -> dict[str, torch.Tensor]:
    """Keep only KV heads ``keep_groups`` of layer ``index`` and the query heads that read them
    (q/k/v rows, output projection columns); the full-size projections are set aside
    (``replace``). head_dim is unchanged."""
    if adapter.layout.fused_qkv is not None:
        raise ValueError("prune_heads: fused qkv projections are not supported")
    model, layout = adapter.model, adapter.layout
    group = adapter.num_heads // adapter.num_kv_heads
    q_heads = [g * group + j for g in sorted(keep_groups) for j in range(group)]
    device = adapter.layer(index).get_submodule(layout.attn_out).weight.device
    q_idx = head_rows(q_heads, adapter.head_dim, device)
    kv_idx = head_rows(sorted(keep_groups), adapter.head_dim, device)
    plan = {layout.attn_q: (q_idx, "out"), layout.attn_k: (kv_idx, "out")}
    plan[layout.attn_v] = (kv_idx, "out")
    plan[layout.attn_out] = (q_idx, "in")
    changed: dict[str, torch.Tensor] = {}
    for relative, (idx, side) in plan.items():
        assert relative is not None
        path = adapter.module_path(index, relative)
        new = select(model.get_submodule(path), idx, side)  # type: ignore[arg-type]
        replace(model, path, new, set_aside)
        changed.update(module_tensors(path, new))
    attn = model.get_submodule(adapter.module_path(index, layout.attn_out).rpartition(".")[0])
    for name, value in (("num_heads", len(q_heads)), ("num_key_value_heads", len(keep_groups))):
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, value)
    return changed


def _resize_fresh(model: nn.Module, path: str, out_features: int, in_features: int) -> None:
    old = model.get_submodule(path)
    if _out_in(old) == (out_features, in_features):
        return
    has_bias = getattr(old, "bias", None) is not None
    replace(model, path, _new_projection(old, out_features, in_features, has_bias))


def apply_layer_widths(
    model: nn.Module,
    mlp_widths: Sequence[int] | None = None,
    kv_heads: Sequence[int] | None = None,
) -> None:
    """Give a freshly built model the per-layer shapes of a non-uniformly pruned checkpoint
    (before its state dict is loaded): ``mlp_widths[i]`` neurons and ``kv_heads[i]`` KV heads
    in layer i. Values are not initialised; load the checkpoint's tensors afterwards."""
    from modelsurgery.models.adapters import get_adapter

    adapter = get_adapter(model)
    layout = adapter.layout
    group = adapter.num_heads // adapter.num_kv_heads
    for i in range(adapter.num_layers):
        if mlp_widths is not None:
            hidden = adapter.hidden_size
            for relative in layout.mlp_in:
                _resize_fresh(model, adapter.module_path(i, relative), mlp_widths[i], hidden)
            _resize_fresh(model, adapter.mlp_out_path(i), hidden, mlp_widths[i])
            mlp = model.get_submodule(adapter.mlp_out_path(i).rpartition(".")[0])
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = mlp_widths[i]
        if kv_heads is not None:
            assert layout.attn_q and layout.attn_k and layout.attn_v
            q_width = kv_heads[i] * group * adapter.head_dim
            kv_width = kv_heads[i] * adapter.head_dim
            hidden = adapter.hidden_size
            _resize_fresh(model, adapter.module_path(i, layout.attn_q), q_width, hidden)
            _resize_fresh(model, adapter.module_path(i, layout.attn_k), kv_width, hidden)
            _resize_fresh(model, adapter.module_path(i, layout.attn_v), kv_width, hidden)
            _resize_fresh(model, adapter.attn_out_path(i), hidden, q_width)


def apply_pruned_config(model: nn.Module) -> None:
    """Apply the per-layer widths a pruned checkpoint's config records (no-op without them);
    what ``modelsurgery.models.load`` calls before loading a non-uniform checkpoint."""
    config: Any = model.config
    apply_layer_widths(
        model,
        getattr(config, MLP_WIDTHS_KEY, None),
        getattr(config, KV_HEADS_KEY, None),
    )
