"""EasyEdit hparams (``hparams/ROME/*.yaml``, ``hparams/MEMIT/*.yaml``) as ``rome`` / ``memit``
configs, so their users bring the files they tuned.

Keys with a counterpart are renamed (``v_num_grad_steps`` -> ``v_steps`` ...); keys that only
say where the model keeps its modules, which device to use, or how EasyEdit runs are dropped,
because our architecture adapters and the server decide those. A key whose meaning we share
is honoured only for the values that mean what we do (``v_loss_layer``: the last layer, where
our v* loss is read; ``mom2_dataset``: WikiText; ``mom2_dtype``: float32 or float64, since C
accumulates in float64); any other value, like another ``fact_token``, is an error naming the
key rather than a silent change of meaning. ``mom2_n_samples`` far above our default warns
with the work it asks for. ``schema_with_easyedit_keys`` lists the keys in the JSON Schema, so
an editor validating a spec accepts what the server accepts.
"""

from __future__ import annotations

import warnings
from typing import Any

RENAMED = {
    "v_num_grad_steps": "v_steps",
    "v_lr": "v_lr",
    "v_weight_decay": "weight_decay",
    "clamp_norm_factor": "clamp_factor",
    "kl_factor": "kl_factor",
    "mom2_update_weight": "mom2_weight",
    "mom2_n_samples": "stats_samples",
    "v_loss_layer": "v_loss_layer",
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
        "alg_name",
        "layer_selection",
        "fact_token",
        "mom2_adjustment",
        "layers",
    }
)
# Keys whose values must mean what ours do: accepted values, and what we do instead.
CHECKED = {
    "mom2_dataset": (
        frozenset({"wikitext", "wikitext-2", "wikitext2", "wikitext-2-raw-v1", "wikitext-103"}),
        "second moments are computed on WikiText-2 validation text here; write "
        "mom2_dataset: wikitext or leave the key out",
    ),
    "mom2_dtype": (
        frozenset({"float32", "float64"}),
        "C = E[k k^T] accumulates in float64 here; write float32 or float64 or leave it out",
    ),
}
REQUIRED_VALUES = {"fact_token": "subject_last", "layer_selection": "all"}
EASYEDIT_KEYS = frozenset(RENAMED) | DROPPED | frozenset(CHECKED)
# EasyEdit keys that are also our own fields (same name, same meaning) for a method.
SHARED = {
    "rome": frozenset({"v_lr", "kl_factor", "v_loss_layer"}),
    "memit": frozenset({"v_lr", "kl_factor", "v_loss_layer"}),
}
SHARED["memit"] |= {"layers"}
# Statistics windows above this many times our default warn (EasyEdit ships 100,000).
LARGE_STATS_FACTOR = 8
# Measured: C of ROME's layer of SmolLM2-135M, 256 windows of 256 tokens, on the shared
# 2-core CPU (``benchmarks/stats_time.py --samples 64``: 1.27 s a window); the warning scales
# it by the windows asked for.
DEFAULT_STATS_SECONDS = 325.0


class LargeStatisticsWarning(UserWarning):
    """An EasyEdit ``mom2_n_samples`` that makes the statistics pass very long."""


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
    for key, (accepted, ours) in CHECKED.items():
        if key in values and str(values[key]).lower() not in accepted:
            raise ValueError(f"{key}: {values[key]!r} cannot be honoured: {ours}")
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
    if "mom2_n_samples" in values:
        warn_large_statistics(values["mom2_n_samples"])
    return out


def warn_large_statistics(samples: Any, default: int = 256) -> None:
    """Warn when ``mom2_n_samples`` asks for far more statistics windows than our default,
    with the time it would take at the measured rate (EasyEdit's 100,000 is sized for
    Wikipedia on a GPU; the statistics are cached per model and layer afterwards)."""
    if not isinstance(samples, int) or samples <= LARGE_STATS_FACTOR * default:
        return
    hours = DEFAULT_STATS_SECONDS * samples / default / 3600
    warnings.warn(
        f"mom2_n_samples: {samples} windows is {samples / default:.0f}x our default {default}; "
        f"the second-moment statistics would take about {hours:.1f} h per edited layer on a "
        f"2-core CPU (a 135M model; longer for larger ones) before the first edit; "
        f"leave it out for the default unless you need EasyEdit's statistics exactly",
        LargeStatisticsWarning,
        stacklevel=2,
    )


# YAML 1.1 (PyYAML) reads EasyEdit's ``v_lr: 5e-1`` as a string; pydantic takes it as the
# number it spells, so the schema does too.
NUMERIC_STRING = {"type": "string", "pattern": r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"}


def _with_numeric_strings(prop: dict[str, Any]) -> None:
    """A number property (or an anyOf holding one) also accepts a numeric string."""
    if prop.get("type") == "number":
        number = {
            k: prop.pop(k)
            for k in list(prop)
            if k in ("type", "minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
        }
        prop["anyOf"] = [number, NUMERIC_STRING]
    elif any(option.get("type") == "number" for option in prop.get("anyOf", [])):
        prop["anyOf"].append(NUMERIC_STRING)


def schema_with_easyedit_keys(schema: dict[str, Any]) -> None:
    """Add the EasyEdit keys to a ``rome`` / ``memit`` JSON Schema (pydantic's
    ``json_schema_extra``), each described by what it becomes; number fields also take the
    numeric strings PyYAML leaves of EasyEdit's exponents, as validation does."""
    properties = schema.setdefault("properties", {})
    for prop in properties.values():
        _with_numeric_strings(prop)
    for key in sorted(EASYEDIT_KEYS - set(properties)):
        if key in RENAMED:
            what = f"EasyEdit hparams key: sets {RENAMED[key]}"
        elif key in CHECKED:
            what = f"EasyEdit hparams key: checked ({CHECKED[key][1]})"
        elif key in REQUIRED_VALUES:
            what = f"EasyEdit hparams key: only {REQUIRED_VALUES[key]!r}"
        else:
            what = "EasyEdit hparams key: accepted, decided by the server and adapters"
        properties[key] = {"description": what}
