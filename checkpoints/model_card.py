"""The model card (``README.md``) of an exported version, and the warning for hook versions.

The Hub reads the card's YAML front matter (base model, relation); a person reads the lineage,
each operation's config and the metrics. A version whose edit lives in hooks (ReFT, unbaked
steering) loads in plain transformers as the unedited base without a word, so its card says
how to load it and exporting or downloading it warns (:func:`warn_if_hooked`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from modelsurgery.checkpoints.manifest import Manifest
from modelsurgery.proto.export_record import (
    HOOKS_KEY,
    LINEAGE_FILE,
    HookedExportWarning,
    warn_if_hooked,
)

LIBRARY_TAG = "modelsurgery"
FAILED_GATES_TAG = "failed-gates"
__all__ = [
    "HOOKS_KEY",
    "LIBRARY_TAG",
    "HookedExportWarning",
    "render_adapter_card",
    "render_model_card",
    "warn_if_hooked",
]


def render_model_card(
    lineage: Sequence[Manifest],
    digest: str,
    hooks: Mapping[str, str],
    base_model: str | None = None,
) -> str:
    """The card of ``lineage[0]`` (lineage is [self, parent, ..., root]); ``hooks`` maps each
    carried hook method to its loading note; ``base_model`` is the Hub id of the root when
    known (a built-in alias), else the root's reference. Only the manifests' own times appear
    in it."""
    version, root = lineage[0], lineage[-1]
    history = list(reversed(lineage))
    sections = [
        _front_matter(
            base_model or root.root.reference,
            hooks,
            edited=any(m.operations for m in history),
            failed=bool(version.failed_gates),
        ),
        f"# {version.id}\n\n{_summary(version, root, digest)}",
        *_failed_gates(version),
        _how_to_load(hooks),
        _lineage_table(history),
        _operations(history),
        _metrics(version.metrics),
    ]
    return "\n\n".join(sections) + "\n"


def render_adapter_card(lineage: Sequence[Manifest], digest: str, base_model: str) -> str:
    """The card of an adapter export (a peft folder, ``Attachment.adapter_folder``): the Hub's
    peft metadata (``library_name: peft``, ``base_model``), how to load it onto the base, then
    the lineage, operations and metrics as for any version."""
    version, root = lineage[0], lineage[-1]
    history = list(reversed(lineage))
    meta: dict[str, Any] = {
        "base_model": base_model,
        "base_model_relation": "adapter",
        "library_name": "peft",
        "tags": [LIBRARY_TAG, "lora", *([FAILED_GATES_TAG] if version.failed_gates else [])],
    }
    how = (
        "## How to load\n\nA peft LoRA adapter for `"
        + base_model
        + "` (not merged; this folder holds no base weights):\n\n```python\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\n\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base_model}")\n'
        "model = PeftModel.from_pretrained(base, folder)  # merge_and_unload() for plain weights\n"
        "```"
    )
    sections = [
        f"---\n{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)}---",
        f"# {version.id}\n\n{_summary(version, root, digest)}",
        *_failed_gates(version),
        how,
        _lineage_table(history),
        _operations(history),
        _metrics(version.metrics),
    ]
    return "\n\n".join(sections) + "\n"


def _front_matter(
    reference: str, hooks: Mapping[str, str], *, edited: bool, failed: bool = False
) -> str:
    meta: dict[str, Any] = {"base_model": reference}
    if hooks:
        meta["base_model_relation"] = "adapter"
    elif edited:
        meta["base_model_relation"] = "finetune"
    meta["library_name"] = "transformers"
    meta["tags"] = [LIBRARY_TAG, *([FAILED_GATES_TAG] if failed else [])]
    return f"---\n{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)}---"


def _summary(version: Manifest, root: Manifest, digest: str) -> str:
    what = (
        f"`{root.root.reference}` as imported into"
        if version is root
        else f"A version of `{root.root.reference}` made with"
    )
    return "\n".join(
        [
            f"{what} {LIBRARY_TAG}, exported from its checkpoint store; `{LINEAGE_FILE}` "
            "beside this card holds the full manifest.",
            "",
            f"- Version: `{version.id}`",
            f"- Weights digest: `{digest}`",
            f"- Base model: `{root.root.reference}` (version `{root.id}`, weights digest "
            f"`{root.root.digest}`)",
        ]
    )


def _failed_gates(version: Manifest) -> list[str]:
    """A kept candidate (``keep_failed``) says first that its job's gates failed."""
    if not version.failed_gates:
        return []
    rows = [
        f"| {g.get('metric')} | {g.get('condition')} | "
        f"{'-' if g.get('value') is None else format(g['value'], '.6g')} | "
        f"{'pass' if g.get('passed') else 'FAIL'} |"
        for g in version.failed_gates
    ]
    return [
        "\n".join(
            [
                "## Failed its gates",
                "",
                "> **This candidate failed its job's gates and was kept for inspection "
                "(`keep_failed`); it was not published under an alias.**",
                "",
                "| gate | condition | value | result |",
                "|---|---|---|---|",
                *rows,
            ]
        )
    ]


def _how_to_load(hooks: Mapping[str, str]) -> str:
    if not hooks:
        return (
            "## How to load\n\nNo hooks: `AutoModelForCausalLM.from_pretrained(folder)` loads "
            "this version as it is (its tokenizer: `AutoTokenizer.from_pretrained(folder)`)."
        )
    parts = [
        "## How to load",
        f"> **This version's edit lives in hooks ({', '.join(hooks)}), not in the weights.** "
        "Plain `AutoModelForCausalLM.from_pretrained(folder)` loads the unedited base model.",
    ]
    for method, note in hooks.items():
        parts += [f"### {method}", note]
    return "\n\n".join(parts)


def _methods(manifest: Manifest) -> str:
    if manifest.parent is None and not manifest.operations:
        return f"import of `{manifest.root.reference}`"
    return ", ".join(str(op.get("method", "?")) for op in manifest.operations) or "-"


def _lineage_table(history: Sequence[Manifest]) -> str:
    rows = [f"| `{m.id}` | {_methods(m)} | {m.created} |" for m in history]
    header = ["## Lineage", "", "Root first.", "", "| version | operations | created |"]
    return "\n".join([*header, "|---|---|---|", *rows])


def _operations(history: Sequence[Manifest]) -> str:
    parts = ["## Operations"]
    number = 0
    for manifest in history:
        for operation in manifest.operations:
            number += 1
            config = yaml.safe_dump(operation, sort_keys=False, allow_unicode=True).rstrip()
            parts += [
                f"### {number}. {operation.get('method', '?')} (version `{manifest.id}`)",
                f"```yaml\n{config}\n```",
            ]
    if number == 0:
        parts.append("None: this is the imported base model.")
    return "\n\n".join(parts)


def _metrics(metrics: Mapping[str, float]) -> str:
    if not metrics:
        return "## Metrics\n\nNone recorded for this version."
    rows = [f"| {name} | {value:.6g} |" for name, value in sorted(metrics.items())]
    return "\n".join(["## Metrics", "", "| metric | value |", "|---|---|", *rows])
