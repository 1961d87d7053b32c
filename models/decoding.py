"""Where a forward call of a decoder stack sits in generation: hooks that treat the prompt
(prefill) call and the cached decoding steps differently (ReFT, position-restricted steering)
read it here, whatever transformers version passes the cache under which keyword."""

from __future__ import annotations

from typing import Any

import torch


def past_length(args: tuple, kwargs: dict[str, Any]) -> int:
    """How many tokens precede this call's tokens, from the first signal the call carries:
    an explicit cache position, a cache object (any keyword), a legacy tuple cache, or a 2-D
    attention mask wider than the call's tokens."""
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return int(cache_position.reshape(-1)[0])
    for value in kwargs.values():
        if hasattr(value, "get_seq_length"):
            return int(value.get_seq_length())
    legacy = kwargs.get("past_key_values")
    if isinstance(legacy, tuple | list) and len(legacy):
        return int(legacy[0][0].shape[-2])
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    mask = kwargs.get("attention_mask")
    if tokens is not None and isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return max(0, int(mask.shape[1]) - int(tokens.shape[1]))
    return 0
