"""One entry point for every kind of base model: ``load(reference)`` -> model, tokenizer, digest.

The digest (``models.digest.model_digest``) is computed once, on CPU, in the dtype the model is
returned in; caches (second moments, loaded-model LRU) key on it. ``trust_remote_code`` is never
on: a reference can name weights, not code.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from modelsurgery.models.aliases import BUILTIN_ALIASES
from modelsurgery.models.build import build_model, has_layer_widths, read_folder_state_dict
from modelsurgery.models.digest import model_digest
from modelsurgery.models.errors import ModelReferenceError
from modelsurgery.models.gguf import load_gguf, load_gguf_config
from modelsurgery.models.placement import Placement, place
from modelsurgery.models.references import ResolvedReference, SourceKind, resolve_reference
from modelsurgery.models.stored import (
    GENERATION_CONFIG_FILE,
    StoreReader,
    load_stored_config,
    load_stored_model,
    load_stored_tokenizer,
)

Progress = Callable[[str], None]
PathRoots = Sequence[str | os.PathLike[str]]


@dataclass
class LoadedModel:
    """A base model ready for surgery: ``model`` is in eval mode on the requested device."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    digest: str
    reference: str
    source_kind: SourceKind
    version_id: str | None = None
    path: Path | None = None
    revision: str | None = None
    """The commit a Hugging Face Hub reference resolved to."""
    hooks: Any = None
    """The attached hooks (``editing.attachments.AttachedHooks``: ReFT interventions, unbaked
    steering ...) when the checkpoint carries any, else None; ``hooks.remove()`` detaches
    them."""

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config


def load(
    reference: str | os.PathLike[str],
    *,
    store: StoreReader | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    placement: Placement | None = None,
    allowed_roots: PathRoots | None = None,
    progress: Progress | None = None,
    with_hooks: bool = True,
) -> LoadedModel:
    """Load a folder, a GGUF file, a Hub repository (``org/name[@revision]`` from the local
    Hugging Face cache), a built-in alias or a stored version (see ``resolve_reference``).

    ``dtype`` None keeps the checkpoint's own dtype (float32 for dequantised GGUF);
    ``placement`` puts it over a worker's devices (``models.placement``) instead of on ``device``;
    ``allowed_roots`` restricts path references (the server passes its model folders).
    A checkpoint (exported folder or stored version) that carries a hook method's artifacts
    comes with those hooks attached unless ``with_hooks`` is False (the server attaches them per
    call instead, because its warm models are shared between versions with the same weights).
    """
    say = progress or (lambda _message: None)
    resolved = resolve_reference(reference, allowed_roots, store=store)
    torch_dtype = as_dtype(dtype)
    say(f"loading {resolved.kind.value} {resolved.reference}")
    model, tokenizer = _load_weights(resolved, store, torch_dtype)
    model.eval()
    if resolved.kind is SourceKind.STORE and torch_dtype is None:
        assert store is not None and resolved.version_id is not None
        digest = store.digest(resolved.version_id)  # the manifest's tensor hashes: no pass
    else:
        say("hashing weights")
        digest = model_digest(model)
    if placement is not None:
        place(model, placement)
    elif device is not None:
        model.to(device)
    hooks = _attach_hooks(model, resolved, store) if with_hooks else None
    say("loaded")
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        digest=digest,
        reference=resolved.reference,
        source_kind=resolved.kind,
        version_id=resolved.version_id,
        path=resolved.path,
        revision=resolved.revision,
        hooks=hooks,
    )


def _attach_hooks(
    model: PreTrainedModel, resolved: ResolvedReference, store: StoreReader | None
) -> Any:
    from modelsurgery.editing.attachments import (
        attach_hooks,
        folder_hook_artifacts,
        stored_hook_artifacts,
    )

    artifacts: dict[str, bytes] = {}
    if resolved.kind is SourceKind.FOLDER and resolved.path is not None:
        artifacts = folder_hook_artifacts(resolved.path)
    elif resolved.kind is SourceKind.STORE and store is not None and resolved.version_id:
        artifacts = stored_hook_artifacts(store, resolved.version_id)
    return attach_hooks(model, artifacts) if artifacts else None


def load_config(
    reference: str | os.PathLike[str],
    store: StoreReader | None = None,
    *,
    allowed_roots: PathRoots | None = None,
) -> PretrainedConfig:
    """The model's config without loading weights, to check layer/head indices before queueing.

    GGUF files: transformers' GGUF metadata reader (no tensor is dequantised), cached per file.
    """
    resolved = resolve_reference(reference, allowed_roots, store=store)
    if resolved.kind is SourceKind.STORE:
        assert store is not None and resolved.version_id is not None
        return load_stored_config(store, resolved.version_id)
    if resolved.is_gguf:
        return load_gguf_config(_gguf_file(resolved), resolved.reference)
    try:
        return AutoConfig.from_pretrained(resolved.path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise _does_not_load(resolved, exc) from exc


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.float16`` or its name (``"float16"``, ``"torch.float16"``); None passes through."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"unknown floating-point dtype {dtype!r}")
    return value


def _load_weights(
    resolved: ResolvedReference, store: StoreReader | None, dtype: torch.dtype | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if resolved.kind is SourceKind.STORE:
        assert store is not None and resolved.version_id is not None
        model = load_stored_model(store, resolved.version_id, dtype)
        return model, load_stored_tokenizer(store, resolved.version_id)
    assert resolved.path is not None
    try:
        if resolved.is_gguf:
            return load_gguf(_gguf_file(resolved), dtype, resolved.reference)
        model = _load_folder_model(resolved.path, dtype, resolved.reference)
        return model, AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=False)
    except ModelReferenceError:
        raise
    except (OSError, ValueError, SafetensorError) as exc:
        raise _does_not_load(resolved, exc) from exc
    except pickle.UnpicklingError as exc:
        # torch's message suggests weights_only=False, which this server never does.
        raise ModelReferenceError(
            f"model reference {resolved.reference!r} does not load: its pickled weights hold "
            "objects other than tensors, which this server does not unpickle; convert the "
            "model to safetensors"
        ) from exc


def _does_not_load(resolved: ResolvedReference, exc: Exception) -> ModelReferenceError:
    """The loader's complaint in the caller's own words: the reference they gave stands in for
    the path it resolved to (a symlink's target or a root the caller was never told)."""
    assert resolved.path is not None
    complaint = str(exc).replace(str(resolved.path), resolved.reference)
    return ModelReferenceError(
        f"model reference {resolved.reference!r} does not load: {type(exc).__name__}: {complaint}"
    )


def _load_folder_model(folder: Path, dtype: torch.dtype | None, reference: str) -> PreTrainedModel:
    """``from_pretrained``, except for non-uniformly pruned exports, which it cannot build."""
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if has_layer_widths(config):
        state = read_folder_state_dict(folder)
        if dtype is None:
            dtype = next((t.dtype for t in state.values() if t.is_floating_point()), None)
        model = build_model(config, state, dtype or torch.float32, f"model {reference!r}")
        if (folder / GENERATION_CONFIG_FILE).is_file():
            model.generation_config = GenerationConfig.from_pretrained(folder)
        return model
    kwargs: dict[str, object] = {"trust_remote_code": False}
    if dtype is not None:
        kwargs["dtype"] = dtype
    return AutoModelForCausalLM.from_pretrained(folder, config=config, **kwargs)


def _gguf_file(resolved: ResolvedReference) -> Path:
    """The GGUF file, assembled first for aliases that ship it in chunks."""
    assert resolved.path is not None
    if resolved.alias is None:
        return resolved.path
    return BUILTIN_ALIASES[resolved.alias].materialize(resolved.path)
