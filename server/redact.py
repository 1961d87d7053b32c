"""Error messages for callers: the server's own paths replaced by placeholders, control
characters (ANSI colour codes) removed, length bounded, pydantic errors without input values.

A caller learns what went wrong with their request, never where the server keeps its files;
the full exception goes to the server's or worker's log instead.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import ValidationError

from modelsurgery.editing.data import shared_data_dir, validation_problem

MAX_MESSAGE_CHARS = 1000
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|[\x00-\x08\x0b-\x1f\x7f]")


class ServerPlaces(Protocol):
    """What both the server's and the worker's settings know about where files live."""

    store_root: Path
    data_roots: tuple[Path, ...]
    model_roots: tuple[Path, ...] | None


@dataclass(frozen=True)
class Places:
    """The places a component knows that has no server settings (admission: the store and
    the model roots), for ``scrub``."""

    store_root: Path
    model_roots: tuple[Path, ...] | None = None
    data_roots: tuple[Path, ...] = ()


def _placeholders(settings: ServerPlaces) -> list[tuple[str, str]]:
    """(path, placeholder), longest path first so the most specific place wins."""
    places: list[tuple[Path, str]] = [
        (Path.home(), "~"),
        (Path.cwd(), "<cwd>"),
        (settings.store_root.parent, "<home>"),
        (settings.store_root, "<store>"),
        (shared_data_dir(), "<shared-data>"),
    ]
    cache_dir = getattr(settings, "cache_dir", None)
    if cache_dir is not None:
        places.append((Path(cache_dir), "<cache>"))
    # The server's settings also know the default roots under its home (``*_folders``).
    data_roots = getattr(settings, "data_folders", settings.data_roots)
    model_roots = getattr(settings, "model_folders", settings.model_roots)
    places += [(Path(root), "<data-root>") for root in data_roots]
    places += [(Path(root), "<model-root>") for root in model_roots or ()]
    pairs: dict[str, str] = {}
    for path, placeholder in places:
        for form in {os.path.abspath(path), str(path.resolve())}:
            # "/" or a one-part path would swallow every path in the message.
            if len(Path(form).parts) > 1:
                pairs[form] = placeholder
    return sorted(pairs.items(), key=lambda pair: len(pair[0]), reverse=True)


def scrub(message: str, settings: ServerPlaces) -> str:
    """``message`` without the server's home, store, roots, shared data, cwd or user home
    (each replaced by ``<home>``, ``<data-root>`` ...), control characters or excess length."""
    text = _CONTROL.sub("", message)
    for path, placeholder in _placeholders(settings):
        # Whole path components only: "/srv/data" must not eat into "/srv/database".
        text = re.sub(re.escape(path) + r"(?![\w.-])", lambda _m, p=placeholder: p, text)
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 1] + "…"
    return text


def caller_message(exc: BaseException, settings: ServerPlaces) -> str:
    """A job's ``error``: the exception's type and message, scrubbed; a pydantic error lists
    its problems without the offending values."""
    detail = validation_problem(exc) if isinstance(exc, ValidationError) else str(exc)
    return scrub(f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__, settings)
