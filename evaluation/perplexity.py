"""WikiText-2 perplexity: the fluency check of every job, and the reference models' values
kept on disk."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

from modelsurgery.editing.data import shared_data_path

from .suite import PerplexityProtocol

DEFAULT_MAX_TOKENS = 4096
DEFAULT_WINDOW = 512


@lru_cache(maxsize=8)
def _test_ids(tokenizer: object, max_tokens: int) -> torch.Tensor:
    text = shared_data_path("wikitext-2/wiki.test.raw").read_text(encoding="utf-8")
    # The first ~60k characters hold far more than max_tokens tokens for any tokenizer we use.
    ids = tokenizer(text[: max(200_000, max_tokens * 20)], return_tensors="pt").input_ids[0]
    return ids[:max_tokens]


def default_window(max_tokens: int) -> int:
    """The window a method's perplexity uses: 512 tokens, or all of them when fewer."""
    return min(DEFAULT_WINDOW, max_tokens)


@torch.no_grad()
def wikitext_perplexity(
    model: torch.nn.Module,
    tokenizer: object,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    window: int | None = None,
    batch_size: int = 4,
) -> float:
    """Perplexity on the first ``max_tokens`` tokens of ``wiki.test.raw`` in non-overlapping
    windows of ``window`` tokens (the Wanda / SparseGPT protocol; None: ``default_window``)."""
    if window is None:
        window = default_window(max_tokens)
    ids = _test_ids(tokenizer, max_tokens)
    n = ids.numel() // window
    if n == 0:
        raise ValueError(f"max_tokens {max_tokens} is shorter than one window of {window}")
    windows = ids[: n * window].view(n, window)
    device = next(model.parameters()).device
    total_nll, total_count = 0.0, 0
    for start in range(0, n, batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_count += batch[:, 1:].numel()
    return math.exp(total_nll / total_count)


class PerplexityCache:
    """Perplexities of reference models by (digest, protocol), kept on disk: the base of a
    CI patch is the same model job after job."""

    def __init__(self, root: Path | None) -> None:
        self.root = root

    def _path(self, digest: str, protocol: PerplexityProtocol) -> Path | None:
        if self.root is None:
            return None
        name = f"{digest}-{protocol.tokens}-{protocol.window}-{protocol.dataset_sha256[:16]}.json"
        return self.root / "evaluation" / "perplexity" / name

    def get(self, digest: str, protocol: PerplexityProtocol, compute: Callable[[], float]) -> float:
        path = self._path(digest, protocol)
        if path is not None and path.is_file():
            return float(json.loads(path.read_text())["perplexity"])
        value = compute()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"perplexity": value}))
            tmp.replace(path)
        return value
