"""Descriptions of the registered methods and their config fields, for ``modelsurgery methods``
and the JSON Schema: a field's ``Field(description=...)``, else the entry its class docstring
gives it (``name: text`` or ``name, other: text``, continued on indented lines), else None."""

from __future__ import annotations

import inspect
import re
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from modelsurgery.editing.registry import MethodConfig, method_configs

# "name: text", "name, name2: text", "name / name2: text" or "name (when): text" at the start
# of a docstring line.
_ENTRY = re.compile(
    r"^([a-z_][a-z0-9_]*(?:(?:,|\s*/)\s*[a-z_][a-z0-9_]*)*)(?:\s*\(([^)]*)\))?:(?:\s+(.*))?$"
)


def docstring_fields(config: type[BaseModel]) -> dict[str, str]:
    """The field entries of the docstrings of ``config`` and its bases (the nearest wins)."""
    found: dict[str, str] = {}
    for cls in reversed(config.__mro__):
        found.update(_entries(inspect.cleandoc(cls.__dict__.get("__doc__") or "")))
    return {name: text for name, text in found.items() if name in config.model_fields}


def _entries(doc: str) -> dict[str, str]:
    entries: dict[str, str] = {}
    names: list[str] = []
    lines: list[str] = []

    def close() -> None:
        text = " ".join(" ".join(lines).split())
        for name in names:
            if text:
                entries[name] = text
        names.clear()
        lines.clear()

    for line in doc.splitlines():
        match = _ENTRY.match(line)
        if match is not None:
            close()
            names.extend(n.strip() for n in re.split(r"[,/]", match.group(1)))
            lines.append(f"({match.group(2)}) " if match.group(2) else "")
            lines.append(match.group(3) or "")
        elif names and line.startswith((" ", "-")) and line.strip():
            lines.append(line.strip())
        else:
            close()
    close()
    return entries


def field_descriptions(config: type[BaseModel]) -> dict[str, str | None]:
    """Every field's description: its own, else its docstring entry, else None."""
    documented = docstring_fields(config)
    return {
        name: field.description or documented.get(name)
        for name, field in config.model_fields.items()
    }


# A sentence ends at a full stop before a capital, not at "et al. 2023".
_SENTENCE_END = re.compile(r"(?<!\bal)\.\s+(?=[A-Z])")


def type_name(annotation: Any) -> str:
    """A field's type as a user reads it: ``list[str] | None``, ``'last' | 'mean'``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(value) for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(type_name(arg) for arg in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def summary(config: type[MethodConfig]) -> str:
    """The first sentence of the config's docstring: what the method does."""
    paragraph = " ".join((inspect.getdoc(config) or "").split("\n\n", 1)[0].split())
    return _SENTENCE_END.split(paragraph, maxsplit=1)[0].removesuffix(".")


def _default(field: FieldInfo) -> Any:
    if field.is_required():
        return None
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return field.default


def parameters(config: type[MethodConfig]) -> list[dict[str, Any]]:
    """Each field but ``method``, in declaration order."""
    described = field_descriptions(config)
    return [
        {
            "name": name,
            "type": type_name(field.annotation),
            "required": field.is_required(),
            "default": _default(field),
            "description": described[name],
        }
        for name, field in config.model_fields.items()
        if name != "method"
    ]


def described_methods() -> list[dict[str, Any]]:
    """Every registered method by name: what it does and its parameters."""
    return [
        {"method": name, "description": summary(config), "parameters": parameters(config)}
        for name, config in method_configs().items()
    ]
