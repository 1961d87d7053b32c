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
__all__ = ["HOOKS_KEY", "LIBRARY_TAG", "HookedExportWarning", "render_model_card", "warn_if_hooked"]


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
            base_model or root.root.reference, hooks, edited=any(m.operations for m in history)
        ),
        f"# {version.id}\n\n{_summary(version, root, digest)}",
        _how_to_load(hooks),
        _lineage_table(history),
        _operations(history),
        _metrics(version.metrics),
    ]
    return "\n\n".join(sections) + "\n"


def _front_matter(reference: str, hooks: Mapping[str, str], *, edited: bool) -> str:
    meta: dict[str, Any] = {"base_model": reference}
    if hooks:
        meta["base_model_relation"] = "adapter"
    elif edited:
        meta["base_model_relation"] = "finetune"
    meta["library_name"] = "transformers"
    meta["tags"] = [LIBRARY_TAG]
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
