"""Hook artifacts of any method, through the registry: which a version or folder carries,
attaching all of them to a model, and the lineage rule they impose.

The loader, the worker (jobs, Generate, Evaluate) and submit validation call these; none of
them knows which method made the hooks (ReFT interventions, unbaked steering vectors ...).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from modelsurgery.editing.registry import Detachable, Method, MethodConfig, hook_methods
from modelsurgery.models.stored import StoreReader, stored_artifact_names


@dataclass
class AttachedHooks:
    """Every method's hooks attached to one model; ``remove()`` detaches them all."""

    methods: list[str] = field(default_factory=list)
    handles: list[Detachable] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.handles)

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()
        self.methods.clear()

    def __enter__(self) -> AttachedHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _carried(names: Iterable[str]) -> list[Method]:
    """The hook methods whose marker artifact (the first they declare) is among ``names``."""
    present = set(names)
    return [m for m in hook_methods() if m.attachment and m.attachment.artifacts[0] in present]


def hook_artifact_names() -> set[str]:
    return {name for m in hook_methods() if m.attachment for name in m.attachment.artifacts}


def attach_hooks(model: nn.Module, artifacts: Mapping[str, bytes]) -> AttachedHooks:
    """Attach the hooks of every method whose files are in ``artifacts`` (other files, such as
    a head score table or the evaluation suite, are ignored)."""
    attached = AttachedHooks()
    try:
        for method in _carried(artifacts):
            assert method.attachment is not None
            missing = [n for n in method.attachment.artifacts if n not in artifacts]
            if missing:
                raise ValueError(f"{method.name} hooks are incomplete: missing {missing}")
            attached.handles.append(method.attachment.attach(model, artifacts))
            attached.methods.append(method.name)
    except BaseException:
        attached.remove()
        raise
    return attached


def stored_hook_artifacts(store: StoreReader, version_id: str) -> dict[str, bytes]:
    """The hook files a stored version carries (own or inherited); only those are read."""
    wanted = hook_artifact_names() & set(stored_artifact_names(store, version_id))
    return {name: store.read_file(version_id, name) for name in sorted(wanted)}


def folder_hook_artifacts(folder: str | Path) -> dict[str, bytes]:
    """The hook files an exported folder keeps beside its weights."""
    root = Path(folder)
    return {
        name: (root / name).read_bytes()
        for name in sorted(hook_artifact_names())
        if (root / name).is_file()
    }


def loading_notes(artifact_names: Iterable[str]) -> dict[str, str]:
    """Method name -> how to load a folder with its hooks, for each hook method a version with
    these artifacts carries (the export's model card and warning)."""
    return {m.name: m.attachment.loading for m in _carried(artifact_names) if m.attachment}


def adapter_folder(artifact_names: Iterable[str]) -> str | None:
    """The artifact folder that is a version's whole export when the only hooks it carries
    are one method's self-contained adapter (``Attachment.adapter_folder``), else None."""
    carried = [m.attachment for m in _carried(artifact_names) if m.attachment]
    return carried[0].adapter_folder if len(carried) == 1 else None


def leaf_methods(artifact_names: Iterable[str]) -> list[str]:
    """Names of the leaf methods whose hooks a version with these artifacts carries."""
    return [m.name for m in _carried(artifact_names) if m.attachment and m.attachment.leaf]


def combination_error(
    base_artifacts: Iterable[str],
    operations: Sequence[MethodConfig],
    model_config: Any,
) -> str | None:
    """Why a job's operations cannot run on its base under the hook methods' lineage rules
    (the message starts with the field path), or None when the combination is allowed."""
    leaves = leaf_methods(base_artifacts)
    if leaves:
        return (
            f"base: the version carries {', '.join(leaves)} hooks fitted to its exact weights, "
            "so it cannot be the base of another job; edit the weights first, then run "
            f"{leaves[0]} last"
        )
    leaf_at = [
        i
        for i, operation in enumerate(operations)
        if operation.leaves_hooks(model_config) and _is_leaf(operation.method)
    ]
    if len(leaf_at) > 1:
        return (
            f"operations[{leaf_at[1]}]: at most one operation per job may leave hooks "
            f"({operations[leaf_at[0]].method} at operations[{leaf_at[0]}] does)"
        )
    if leaf_at and leaf_at[0] != len(operations) - 1:
        return (
            f"operations[{leaf_at[0] + 1}]: no operation may follow "
            f"{operations[leaf_at[0]].method}, which leaves hooks (a later edit would change "
            "the activations they were fitted to)"
        )
    return None


def _is_leaf(method_name: str) -> bool:
    return any(m.name == method_name and m.attachment and m.attachment.leaf for m in hook_methods())
