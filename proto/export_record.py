"""What a client reads from an exported or downloaded folder's lineage record
(``modelsurgery.json``): the hook methods the version carries, and the warning that plain
``from_pretrained`` does not apply them. Torch-free: the SDK's download warns through it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

LINEAGE_FILE = "modelsurgery.json"
HOOKS_KEY = "hooks"
LOAD_HINT = "load it with modelsurgery.models.load(folder) (see 'How to load' in its README.md)"


class HookedExportWarning(UserWarning):
    """An exported folder whose edit is in hooks: ``from_pretrained`` loads the unedited base."""


def warn_if_hooked(folder: Path | str) -> None:
    """Warn (HookedExportWarning) when an exported folder's lineage record names hook methods;
    called by every export and download, so the warning names the caller's line."""
    record_path = Path(folder) / LINEAGE_FILE
    try:
        record = json.loads(record_path.read_text())
    except (FileNotFoundError, ValueError):
        return
    hooks = record.get(HOOKS_KEY) or []
    if not hooks:
        return
    version_id = record.get("manifest", {}).get("id", "?")
    warnings.warn(
        f"version {version_id} carries {', '.join(hooks)} hooks, which plain "
        f"AutoModelForCausalLM.from_pretrained does not apply (it loads the unedited base): "
        f"{LOAD_HINT}",
        HookedExportWarning,
        stacklevel=3,
    )
