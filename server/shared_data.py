"""The shared data sets jobs read, checked when the server starts: a server without them (an
image built without its data, a missing ``MODELSURGERY_DATA`` volume) says which methods
cannot run, instead of their jobs failing one by one."""

from __future__ import annotations

import logging
from pathlib import Path

from modelsurgery.editing.data import CROWS_PAIRS_PATH, DATA_ENV, WINOGENDER_DIR, shared_data_dir

log = logging.getLogger("modelsurgery.data")

# Path under the data folder -> what needs it.
NEEDED = {
    "wikitext-2/wiki.test.raw": "perplexity (evaluation, perplexity gates, EvaluateVersion)",
    "wikitext-2/valid.tokens": "ROME/MEMIT second-moment statistics, pruning calibration",
    CROWS_PAIRS_PATH: "CrowS-Pairs bias pairs (bias scoring, bias suites)",
    WINOGENDER_DIR: "WinoGender bias pairs",
}


def missing_data(root: Path | None = None) -> dict[str, str]:
    """The needed paths absent under ``root`` (default: the shared data folder)."""
    folder = root or shared_data_dir()
    return {path: use for path, use in NEEDED.items() if not (folder / path).exists()}


def report_missing_data(root: Path | None = None) -> dict[str, str]:
    """Log one warning naming what is missing and what cannot run; the missing paths."""
    missing = missing_data(root)
    if missing:
        log.warning(
            "shared data missing: these cannot run until %s points at the data folder: %s",
            DATA_ENV,
            "; ".join(f"{use} (needs {path})" for path, use in missing.items()),
            extra={"data_folder": str(root or shared_data_dir()), "missing": sorted(missing)},
        )
    return missing
