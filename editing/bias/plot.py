"""Layer x head heat map of a head score table (the ``head_scores.json`` artifact)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from modelsurgery.editing.mask_heads import parse_head


def plot_head_scores(
    table: bytes | str | dict[str, Any], path: str | Path, *, key: str = "gradient"
) -> Path:
    """Write a PNG heat map of ``table[key]`` (layers down, heads across), chosen heads boxed.
    Uses the Agg canvas directly, so no global matplotlib backend is touched."""
    data = table if isinstance(table, dict) else json.loads(table)
    if key not in data:
        raise ValueError(f"score table has no {key!r} scores (has {sorted(data)})")
    # None = head not scored (e.g. outside the ablation shortlist): drawn blank.
    scores = [[math.nan if v is None else v for v in row] for row in data[key]]
    layers, heads = len(scores), len(scores[0])
    bound = max((abs(v) for row in scores for v in row if not math.isnan(v)), default=0.0) or 1.0
    fig = Figure(figsize=(max(4.0, 0.5 * heads + 2), max(3.0, 0.25 * layers + 1.5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(scores, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    fig.colorbar(image, ax=ax, label=f"{key} score (+ = towards stereotype)")
    for spec in data.get("chosen", []):
        layer, head = parse_head(spec)
        ax.add_patch(_box(layer, head))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_title(f"bias score per head ({key})")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    return out


def _box(layer: int, head: int) -> Rectangle:
    return Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2)
