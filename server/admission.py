"""Admission: a submitted spec checked against the one version its base names now, and that
version pinned for the job.

The base is resolved once, here: an alias or version id to its version, a model reference
(checked against the model roots) to the root version importing it makes. Every check that can
be known before the job runs is made against that version (the methods' ``check_against``,
the hook methods' lineage rules, ``lineage_*`` gates), and the worker runs on the same version
even when the alias moves while the job waits. gRPC-free: the servicer maps ``AdmissionError``
to INVALID_ARGUMENT naming its field, and nothing else.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelsurgery.checkpoints import CheckpointStore, VersionNotFoundError
from modelsurgery.editing.attachments import combination_error
from modelsurgery.editing.data import (
    DATA_ENV,
    resolve_data_file,
    resolve_text_source,
    shared_data_dir,
)
from modelsurgery.editing.registry import MethodConfig
from modelsurgery.evaluation.lineage import lineage_suites, stored_kinds
from modelsurgery.evaluation.metrics import LINEAGE_PREFIX
from modelsurgery.models import ModelReferenceError, load_config
from modelsurgery.models.stored import stored_artifact_names
from modelsurgery.proto.spec import MESSAGE_FIELD, JobSpec, SpecError, check_gates

CONFIG_CACHE_SIZE = 32


class AdmissionError(ValueError):
    """A spec that cannot run on its base; ``field`` is the spec field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class AdmittedJob:
    """``base_version``: the pinned version; None only for a model reference on a server
    without workers to import it (the server that runs the job imports it then)."""

    spec: JobSpec
    base_version: str | None


class Admission:
    """Checks specs and pins their bases. ``import_reference`` imports a model reference into
    the store and returns its root version id (the server's worker does it, so the weights are
    loaded where the job will use them), or None where no worker can."""

    def __init__(
        self,
        store: CheckpointStore,
        *,
        model_roots: tuple[Path, ...] | None,
        max_job_seconds: float,
        import_reference: Callable[[str], str | None],
        data_roots: tuple[Path, ...] = (),
    ) -> None:
        self.store = store
        self.model_roots = model_roots
        self.data_roots = data_roots
        self.max_job_seconds = max_job_seconds
        self.import_reference = import_reference
        self._configs: OrderedDict[str, Any] = OrderedDict()

    def admit(self, spec: JobSpec) -> AdmittedJob:
        if spec.timeout_s > self.max_job_seconds:
            raise AdmissionError(
                "timeout_s",
                f"timeout_s: at most {self.max_job_seconds:g} s on this server "
                "(serve --max-job-seconds)",
            )
        version_id: str | None
        try:
            version_id = self.store.resolve(spec.base)
        except VersionNotFoundError:
            version_id = None
        config = self._model_config(version_id or spec.base)
        self._check(spec, config, version_id)
        if version_id is None:
            version_id = self.import_reference(spec.base)
        return AdmittedJob(spec, version_id)

    def _model_config(self, key: str) -> Any:
        """The HF config (no weights) of a version or model reference, cached."""
        if key not in self._configs:
            try:
                config = load_config(key, store=self.store, allowed_roots=self.model_roots)
            except (ModelReferenceError, OSError, ValueError) as exc:
                # OSError/ValueError: paths the OS rejects (NUL byte, name too long). Server
                # paths in the message (transformers names files) become placeholders; the
                # reference is echoed as the caller wrote it.
                from modelsurgery.server.redact import Places, scrub

                places = Places(self.store.root, self.model_roots)
                parts = str(exc).split(repr(key))
                message = repr(key).join(scrub(part, places) for part in parts)
                raise AdmissionError("base", message) from None
            self._configs[key] = config
            while len(self._configs) > CONFIG_CACHE_SIZE:
                self._configs.popitem(last=False)
        self._configs.move_to_end(key)
        return self._configs[key]

    def _check(self, spec: JobSpec, model_config: Any, version_id: str | None) -> None:
        """Lineage rules, ``lineage_*`` gates and every operation against the base (a model
        reference not yet imported is a root: no artifacts, no stored suites)."""
        artifacts = stored_artifact_names(self.store, version_id) if version_id else []
        problem = combination_error(artifacts, spec.operations, model_config)
        if problem is not None:
            raise AdmissionError(problem.partition(": ")[0], problem)
        gates = {n: c for n, c in spec.gates.items() if n.startswith(LINEAGE_PREFIX)}
        if gates:
            suites = lineage_suites(self.store, version_id) if version_id else []
            try:
                check_gates(gates, spec.operations, stored_kinds(suites))
            except SpecError as exc:
                raise AdmissionError(exc.field, str(exc)) from None
        for index, operation in enumerate(spec.operations):
            try:
                operation.check_against(model_config)
                check_data_files(operation, self.data_roots)
            except ValueError as exc:
                match = MESSAGE_FIELD.match(str(exc))
                raise AdmissionError(
                    f"operations[{index}]" + (f".{match.group(1)}" if match else ""),
                    f"operations[{index}] ({operation.method}): {exc}",
                ) from None


def check_data_files(operation: MethodConfig, data_roots: tuple[Path, ...]) -> None:
    """Every data file the operation names (its config's ``data_file_fields`` and
    ``text_source_fields``) and every shipped data set it reads (``shared_data``) exists where
    the worker will read it; raises ValueError naming the field, as the worker would only
    after the queue."""
    shared = shared_data_dir()
    for name, paths in operation.shared_data().items():
        missing = [path for path in paths if not (shared / path).exists()]
        if missing:
            raise ValueError(
                f"{name}: this server lacks the shared data {', '.join(missing)} "
                f"(its {DATA_ENV} folder; its start-up log lists what is missing)"
            )
    for name in operation.data_file_fields:
        value = getattr(operation, name)
        if value is not None:
            resolve_data_file(value, data_roots, name)
    for name in operation.text_source_fields:
        value = getattr(operation, name)
        if value is not None:
            resolve_text_source(value, data_roots, name)
