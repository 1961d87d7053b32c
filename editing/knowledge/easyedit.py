"""EasyEdit hparams (``hparams/ROME/*.yaml``, ``hparams/MEMIT/*.yaml``) as ``rome`` / ``memit``
configs, so their users bring the files they tuned.

Keys with a counterpart are renamed (``v_num_grad_steps`` -> ``v_steps`` ...); keys that only
say where the model keeps its modules, which device or dataset to use, or how EasyEdit runs
are dropped, because our architecture adapters, the server and WikiText-2 statistics decide
those; a value we cannot honour (another fact token, a layer selection other than ``all``) is
an error naming the key rather than a silent change of meaning.
"""

from __future__ import annotations

from typing import Any

RENAMED = {
    "v_num_grad_steps": "v_steps",
    "v_lr": "v_lr",
    "v_weight_decay": "weight_decay",
    "clamp_norm_factor": "clamp_factor",
    "kl_factor": "kl_factor",
    "mom2_update_weight": "mom2_weight",
    "mom2_n_samples": "stats_samples",
}
# Module templates, runtime and bookkeeping: decided by our adapters and the server.
DROPPED = frozenset(
    {
        "model_name",
        "device",
        "stats_dir",
        "model_parallel",
        "fp16",
        "bf16",
        "batch_size",
        "max_length",
        "rewrite_module_tmp",
        "layer_module_tmp",
        "mlp_module_tmp",
        "attn_module_tmp",
        "ln_f_module",
        "lm_head_module",
        "context_template_length_params",
        "v_loss_layer",
        "mom2_dataset",
        "mom2_dtype",
        "alg_name",
        "layer_selection",
        "fact_token",
        "mom2_adjustment",
        "layers",
    }
)
REQUIRED_VALUES = {"fact_token": "subject_last", "layer_selection": "all"}
EASYEDIT_KEYS = frozenset(RENAMED) | DROPPED
# EasyEdit keys that are also our own fields (same name, same meaning) for a method.
SHARED = {"rome": frozenset({"v_lr", "kl_factor"}), "memit": frozenset({"v_lr", "kl_factor"})}
SHARED["memit"] |= {"layers"}


def is_easyedit(method: str, values: dict[str, Any]) -> bool:
    """Whether an operation is written (partly) in EasyEdit's hparams vocabulary."""
    return any(key in values for key in EASYEDIT_KEYS - SHARED.get(method, frozenset()))


def from_easyedit(method: str, values: dict[str, Any]) -> dict[str, Any]:
    """Our config fields for an operation given (partly) as EasyEdit hparams."""
    alg = values.get("alg_name")
    if alg is not None and str(alg).lower() != method:
        raise ValueError(f"alg_name: {alg!r} hparams cannot configure method {method!r}")
    for key, required in REQUIRED_VALUES.items():
        if key in values and values[key] != required:
            raise ValueError(f"{key}: only {required!r} is supported, got {values[key]!r}")
    out = {k: v for k, v in values.items() if k not in EASYEDIT_KEYS}
    for theirs, ours in RENAMED.items():
        if theirs not in values:
            continue
        if theirs != ours and ours in values:
            raise ValueError(f"{theirs}: given together with {ours!r}, which it sets")
        out[ours] = values[theirs]
    if "mom2_adjustment" in values and method == "rome":
        out["use_mom2"] = bool(values["mom2_adjustment"])
    if "layers" in values:
        layers = list(values["layers"])
        if method == "rome":
            if len(layers) != 1:
                raise ValueError(f"layers: ROME edits one layer, got {layers}")
            out["layer"] = layers[0]
        else:
            out["layers"] = layers
    return out
