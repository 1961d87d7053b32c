"""Context templates: the prefixes an edit's key and v* are averaged over.

ROME/MEMIT sample these prefixes from the model itself (five 10-token generations). We use a
fixed, deterministic set of generic prefixes of similar length instead, so an edit does not
depend on sampling and two runs of one job give the same weights. ``{}`` is the edit prompt.
"""

from __future__ import annotations

BARE = "{}"

DEFAULT_CONTEXT_TEMPLATES: tuple[str, ...] = (
    BARE,
    "The following is a short note. {}",
    "Therefore, as many people know. {}",
    "Because it came up in class today. {}",
    "I looked this up in a book. {}",
    "You might have heard this before. {}",
)

KL_TEMPLATE = "{} is a"


def with_bare_first(templates: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Templates with the bare prompt first: its output at the subject is v*'s starting point."""
    rest = [t for t in templates if t != BARE]
    return (BARE, *rest)


def prefix_length(template: str) -> int:
    """Characters before the prompt in a template (where the subject search starts)."""
    return template.index("{}")
