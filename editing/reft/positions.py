"""Which prompt positions each intervention edits.

Rule (pyreft's ``get_intervention_locations`` for two-sided specs): for a prompt of L tokens
and ``f<a>+l<b>``, the first min(a, L // 2) and the last min(b, L // 2) tokens, so the two sets
never overlap (the middle token of an odd-length prompt stays untouched when both sides want
it). A one-sided spec (``f<a>`` or ``l<b>``) takes min(n, L) tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from modelsurgery.editing.reft.interventions import (
    ALL_POSITIONS,
    FIRST_POSITIONS,
    LAST_POSITIONS,
    intervention_slots,
)


def prompt_positions(length: int, first: int, last: int) -> tuple[list[int], list[int]]:
    """(first positions, last positions) of a prompt of ``length`` tokens, 0-based."""
    cap = length // 2 if first and last else length
    n_first, n_last = min(first, cap), min(last, cap)
    return list(range(n_first)), list(range(length - n_last, length))


def slot_positions(length: int, first: int, last: int, share_weights: bool) -> dict[str, list[int]]:
    """Positions per intervention slot (see ``intervention_slots``)."""
    head, tail = prompt_positions(length, first, last)
    by_slot = {FIRST_POSITIONS: head, LAST_POSITIONS: tail, ALL_POSITIONS: head + tail}
    return {slot: by_slot[slot] for slot in intervention_slots(first, last, share_weights)}


def batch_positions(
    starts: Sequence[int],
    lengths: Sequence[int],
    first: int,
    last: int,
    share_weights: bool,
    device: torch.device | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per slot, absolute indices [B, P] (padded with 0) and a validity mask [B, P] for rows
    whose prompt occupies ``[start, start + length)`` of the sequence."""
    per_row = [slot_positions(length, first, last, share_weights) for length in lengths]
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for slot in intervention_slots(first, last, share_weights):
        width = max((len(row[slot]) for row in per_row), default=0)
        index = torch.zeros(len(per_row), width, dtype=torch.long)
        valid = torch.zeros(len(per_row), width, dtype=torch.bool)
        for b, (start, row) in enumerate(zip(starts, per_row, strict=True)):
            positions = row[slot]
            index[b, : len(positions)] = torch.tensor(positions, dtype=torch.long) + start
            valid[b, : len(positions)] = True
        out[slot] = (index.to(device), valid.to(device))
    return out
