"""The method registry: method name -> pydantic config, and on the server its run function and
attachment.

A surgery method never imports the server. It is a config class plus one function
``run(model, tokenizer, config, context) -> SurgeryResult``. Each method folder registers on
import with its config class and a function that imports its implementation: configs are plain
pydantic, so the client validates a spec through ``config_class`` without torch, and the server
imports ``run`` only when ``get_method`` asks for it. A method that leaves hooks instead of
weights (ReFT, unbaked steering) also declares an ``Attachment``: which artifact files it
stores, how they attach to a loaded model, and its lineage rule. The loader, the worker and
submit validation go through ``editing.attachments``, never a method.

This module imports no torch (it appears in annotations only): the thin client imports it.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict

from modelsurgery.editing.fan_out import FanOut, run_here

if TYPE_CHECKING:
    import torch

BUILTIN_METHOD_PACKAGES = (
    "modelsurgery.editing.mask_heads",
    "modelsurgery.editing.reft",
    "modelsurgery.editing.concepts",
    "modelsurgery.editing.bias",
    "modelsurgery.editing.rome",
    "modelsurgery.editing.memit",
    "modelsurgery.editing.ultraedit",
    "modelsurgery.editing.ablate_direction",
    "modelsurgery.editing.iti",
    "modelsurgery.editing.steer",
    "modelsurgery.editing.lora",
    "modelsurgery.pruning",
)


PERPLEXITY_FIGURES = frozenset({"perplexity_before", "perplexity_after", "perplexity_ratio"})
# A config's dtype field: ``auto`` is resolved on the device (``models.hardware.resolve_dtype``).
DtypeSetting = Literal["auto", "float32", "bfloat16"]


class MethodConfig(BaseModel):
    """Base of every method's config: unknown keys are errors, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    # Suite kinds (``evaluation.metrics.FACTS``, ``PAIRS``) the operation hands to the
    # job-level evaluation through ``SurgeryResult.suite``.
    carries: ClassVar[frozenset[str]] = frozenset()
    # Fields naming a user's file under the server's data roots, and fields naming a text
    # file there or a shared data set by its relative path: admission checks that each one
    # given exists before the job is queued (``server.admission``).
    data_file_fields: ClassVar[tuple[str, ...]] = ()
    text_source_fields: ClassVar[tuple[str, ...]] = ()

    def metric_names(self) -> set[str]:
        """The figures ``run`` reports with this config (gates ``op<i>.<name>``)."""
        return set()

    def resolved(self, model_config: Any) -> MethodConfig:
        """This config with every field ``run`` would choose from the model filled in (family
        defaults, layer rules): what the executor hands to ``run`` and records in the version,
        so a job rebuilt from the manifest reproduces it. Torch-free; the base keeps it as is."""
        return self

    def check_against(self, model_config: Any) -> None:
        """Validate indices and sizes against the base model's HF config (raise ValueError
        naming the field). Called on the server before a job is queued, without loading
        weights; what it needs from the ML stack it imports inside."""

    def shared_data(self) -> dict[str, tuple[str, ...]]:
        """Field -> the shipped data sets (paths under the shared data folder) it makes
        ``run`` read, so admission refuses a job whose data set this server lacks."""
        return {}

    def leaves_hooks(self, model_config: Any) -> bool:
        """Whether ``run`` with this config on this model returns hook artifacts (its method's
        ``Attachment``) instead of, or besides, changed weights."""
        return False


class JobCancelled(Exception):
    """Raised inside a method when the job was cancelled; nothing is published."""


def _cpu() -> torch.device:
    import torch

    return torch.device("cpu")


PutBack = Callable[[], None]


def keep_aside(parameter: Any) -> PutBack:
    """``MethodContext.set_aside`` by default: the tensor stays referenced and comes back."""
    kept = parameter.data

    def put_back() -> None:
        parameter.data = kept

    return put_back


@dataclass
class MethodContext:
    """What a running method may use besides the model: progress, cancellation, data, caches."""

    model_digest: str
    cache_dir: Path
    data_roots: tuple[Path, ...] = ()
    device: torch.device = field(default_factory=_cpu)
    report: Callable[[dict[str, Any]], None] = lambda event: None
    is_cancelled: Callable[[], bool] = lambda: False
    # A file the model being edited carries (None when it has none): written by an earlier
    # operation of this job, else by the job's base version or an ancestor. How a method
    # hands state to the next edit of the same lineage (knowledge editing's preserved keys).
    read_artifact: Callable[[str], bytes | None] = lambda name: None
    # Where independent batches of one operation run (``editing.fan_out``): here by default,
    # on Ray helper actors when the server was started with ``--fan-out``.
    fan_out: FanOut = run_here
    # Lets go of a parameter's tensor while a method runs its module in another form (v* in
    # bfloat16) and returns what puts the value back. On the server a tensor the job has not
    # written is read back from the store then, so nothing holds it meanwhile; by default (and
    # for a written tensor) it is kept referenced.
    set_aside: Callable[[Any], PutBack] = keep_aside

    def progress(self, message: str, **fields: Any) -> None:
        """Emit a progress event (step, loss, metric ...) to the job's watchers."""
        self.report({"message": message, **fields})

    def check_cancelled(self) -> None:
        """Call between steps: raises JobCancelled once the job was cancelled."""
        if self.is_cancelled():
            raise JobCancelled()


@dataclass
class SurgeryResult:
    """What one operation did.

    changed: full state-dict names of tensors whose values (or shapes) changed; the method has
        already applied them to the model it was given.
    config_overrides: HF config keys to change on export (pruning changes widths).
    metrics: flat name -> number, checked by gates and recorded in the manifest.
    artifacts: extra files stored with the version (ReFT intervention safetensors + JSON,
        a head score table ...), name -> bytes.
    suite: what the final model should be judged on, by kind: ``facts`` (fact records as in
        the config), ``pairs`` (``{"stereo", "anti"}`` held out from fitting); the job-level
        evaluation runs it against the base and stores it with the version.
    resolved: config fields whose value was chosen at run time (``auto`` dtypes resolved for
        the device), recorded in the version's operation config in place of the setting.
    """

    changed: dict[str, torch.Tensor] = field(default_factory=dict)
    config_overrides: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, bytes] = field(default_factory=dict)
    suite: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    resolved: dict[str, Any] = field(default_factory=dict)


class RunFunction(Protocol):
    def __call__(
        self, model: torch.nn.Module, tokenizer: Any, config: Any, context: MethodContext
    ) -> SurgeryResult: ...


class Detachable(Protocol):
    def remove(self) -> None: ...


DEFAULT_LOADING = (
    "The edit is kept as hooks beside the weights, not in them: plain "
    "`AutoModelForCausalLM.from_pretrained(folder)` loads the unedited base model. Load the "
    "folder with `modelsurgery.models.load(folder)`, which attaches the hooks "
    "(`loaded.model`, `loaded.tokenizer`; `loaded.hooks.remove()` detaches them)."
)


@dataclass(frozen=True)
class Attachment:
    """How a hook method's artifacts become part of a loaded model.

    artifacts: the file names the method stores with a version (and an export writes beside
        the weights); a version carries the method's hooks when it has the first one.
    attach: registers the hooks on a model from those files; the returned handle's
        ``remove()`` detaches them (the server attaches per call to shared warm models).
    leaf: the lineage rule. A leaf's hooks were fitted to its exact weights, so a version
        carrying them is never a base, and the operation that makes them runs last in its job.
    loading: one short markdown paragraph telling a user how to load an exported folder that
        carries these hooks (the export's model card shows it; plain ``from_pretrained``
        silently gives the unedited base).
    adapter_folder: the artifacts' folder when it is a complete adapter in its library's own
        format (peft): a version whose weights are its root's and whose only hooks these are
        exports as that folder alone, which the library loads onto the base directly.
    """

    artifacts: tuple[str, ...]
    attach: Callable[[torch.nn.Module, Mapping[str, bytes]], Detachable]
    leaf: bool = True
    loading: str = DEFAULT_LOADING
    adapter_folder: str | None = None


@dataclass(frozen=True)
class Implementation:
    """The server half of a method, returned by the loader its folder registers."""

    run: RunFunction
    attachment: Attachment | None = None


@dataclass(frozen=True)
class Method:
    name: str
    config_class: type[MethodConfig]
    run: RunFunction
    attachment: Attachment | None = None


_CONFIGS: dict[str, type[MethodConfig]] = {}
_LOADERS: dict[str, Callable[[], Implementation]] = {}
_METHODS: dict[str, Method] = {}
_LOADING = threading.RLock()


def register_method(
    name: str, config_class: type[MethodConfig], implementation: Callable[[], Implementation]
) -> None:
    """Register a surgery method; called once, at import time, by the method's folder.
    ``implementation`` imports and returns its run function (and attachment) when the server
    first needs them. A name registered twice is an error."""
    if name in _CONFIGS:
        raise ValueError(f"method {name!r} is already registered")
    _CONFIGS[name] = config_class
    _LOADERS[name] = implementation


def load_builtin_methods() -> None:
    """Import every built-in method folder: configs only, no implementation."""
    for package in BUILTIN_METHOD_PACKAGES:
        importlib.import_module(package)


def config_class(name: str) -> type[MethodConfig]:
    """The config class of a method (torch-free: what spec validation uses)."""
    load_builtin_methods()
    try:
        return _CONFIGS[name]
    except KeyError:
        known = ", ".join(sorted(_CONFIGS))
        raise KeyError(f"unknown method {name!r}; known methods: {known}") from None


def method_configs() -> dict[str, type[MethodConfig]]:
    """Every registered method's config class, by name."""
    load_builtin_methods()
    return {name: _CONFIGS[name] for name in sorted(_CONFIGS)}


def method_names() -> list[str]:
    return list(method_configs())


def get_method(name: str) -> Method:
    """A method with its implementation, imported on first use (the server side)."""
    config = config_class(name)
    with _LOADING:
        if name not in _METHODS:
            _METHODS[name] = _load(name, config)
        return _METHODS[name]


def _load(name: str, config: type[MethodConfig]) -> Method:
    implementation = _LOADERS[name]()
    attachment = implementation.attachment
    if attachment is not None:
        if not attachment.artifacts:
            raise ValueError(f"method {name!r}: an attachment names at least one artifact")
        for other in _METHODS.values():
            taken = set(attachment.artifacts) & set(
                other.attachment.artifacts if other.attachment else ()
            )
            if taken:
                raise ValueError(
                    f"method {name!r}: artifacts {sorted(taken)} belong to {other.name!r}"
                )
    return Method(name, config, implementation.run, attachment)


def hook_methods() -> list[Method]:
    """The registered methods that declare an ``Attachment``, by name (imports every
    implementation)."""
    loaded = [get_method(name) for name in method_names()]
    return [method for method in loaded if method.attachment is not None]


def operation_from_record(record: Mapping[str, Any]) -> MethodConfig:
    """The operation config a version's manifest records, ready to run again: the record also
    holds what ``run`` reported besides its config (statistics, null-space ranks), which is
    not a field of the method's config and is dropped; the rest is validated as a spec is."""
    name = record.get("method")
    if not isinstance(name, str):
        raise ValueError("method: an operation record names its method")
    config = config_class(name)
    return config.model_validate({k: v for k, v in record.items() if k in config.model_fields})
