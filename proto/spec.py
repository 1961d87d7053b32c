"""The job spec: one pydantic schema for the SDK, the CLI's YAML files and the gRPC API.

Versioned with the API (``api_version: v1``). Operations are validated against the method
registry's config classes, so an unknown method or an unknown key is an error naming the field,
before any job is queued. Configs are plain pydantic: parsing imports no ML stack, and
``spec_json_schema`` describes every method's operation for editors (``modelsurgery schema``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from google.protobuf import json_format, struct_pb2
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from modelsurgery.editing.registry import MethodConfig, config_class, method_configs
from modelsurgery.evaluation.metrics import EvaluationSettings, gate_problem
from modelsurgery.proto import limits
from modelsurgery.proto.field_docs import field_descriptions
from modelsurgery.v1 import jobs_pb2

API_VERSION = "v1"
ALIAS_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# "field: ..." at the start of a cross-field check's message (the project's convention).
MESSAGE_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*):\s")
_GATE = re.compile(r"^\s*(<=|>=|==|!=|<|>)\s*([-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?)\s*$")
_COMPARATORS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
    "==": operator.eq,
    "!=": operator.ne,
}


class SpecError(ValueError):
    """An invalid spec; ``field`` is the offending field's path, e.g. ``operations[0].layer``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class SpecTooLarge(SpecError):
    """A spec over a size bound (bytes): the server answers RESOURCE_EXHAUSTED."""


def request_field(field: str) -> str:
    """A spec field's path in a SubmitJob request, as a refusal names it (``spec.base``)."""
    return "spec" if field == "spec" else f"spec.{field}"


class Gate(BaseModel):
    """A metric condition such as ``<= 1.05``."""

    model_config = ConfigDict(frozen=True)

    comparator: str
    threshold: float

    @classmethod
    def parse(cls, text: str) -> Gate:
        match = _GATE.match(text)
        if match is None:
            raise ValueError(
                f"condition {text!r} is not '<op> <number>' with op in <=, >=, <, >, ==, !="
            )
        return cls(comparator=match.group(1), threshold=float(match.group(2)))

    def holds(self, value: float) -> bool:
        return _COMPARATORS[self.comparator](value, self.threshold)

    def __str__(self) -> str:
        return f"{self.comparator} {self.threshold:g}"


class JobSpec(BaseModel):
    """What a job does: a base, ordered operations, gates, and an alias to move on success."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_version: Literal["v1"] = API_VERSION
    base: str
    operations: list[MethodConfig]
    gates: dict[str, str] = {}
    alias: str | None = None
    timeout_s: float = Field(
        default=0.0,
        ge=0.0,
        allow_inf_nan=False,
        description="Deadline of the job in seconds once it runs; 0 = the server's maximum "
        "(serve --max-job-seconds), which is also the most it may ask for.",
    )
    evaluation: EvaluationSettings = EvaluationSettings()
    keep_failed: bool = Field(
        default=False,
        description="When a gate fails, keep the candidate as a version for inspection: no "
        "alias moves to it, its manifest and model card say which gates it failed, and the job "
        "still FAILS, naming the kept version.",
    )

    @field_validator("base")
    @classmethod
    def _base_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a model reference, version id or alias")
        if len(value) > limits.MAX_REFERENCE_CHARS:
            raise ValueError(f"at most {limits.MAX_REFERENCE_CHARS} characters")
        return value.strip()

    @field_validator("alias")
    @classmethod
    def _alias_name(cls, value: str | None) -> str | None:
        if value is not None and not ALIAS_PATTERN.match(value):
            raise ValueError(f"alias {value!r} must match {ALIAS_PATTERN.pattern}")
        return value

    def parsed_gates(self) -> dict[str, Gate]:
        return {name: Gate.parse(text) for name, text in self.gates.items()}

    def to_dict(self) -> dict[str, Any]:
        """The spec as stored and sent: what was given, without the defaults filled in (each
        of 10,000 facts would carry every unset field as null, tripling a large spec); it
        parses back to the same spec."""
        return self._as_dict(exclude_defaults=True)

    def _as_dict(self, *, exclude_defaults: bool) -> dict[str, Any]:
        data: dict[str, Any] = {
            "api_version": self.api_version,
            "base": self.base,
            "operations": [
                {
                    "method": op.method,
                    **op.model_dump(mode="json", exclude_defaults=exclude_defaults),
                }
                for op in self.operations
            ],
            "gates": dict(self.gates),
        }
        if self.alias:
            data["alias"] = self.alias
        if self.timeout_s:
            data["timeout_s"] = self.timeout_s
        if self.keep_failed:
            data["keep_failed"] = True
        if self.evaluation != EvaluationSettings():
            data["evaluation"] = self.evaluation.model_dump(mode="json", exclude_none=True)
        return data

    def fingerprint(self) -> str:
        """Hash of the canonical spec, every value filled in: what idempotency compares. The
        same form as before specs were stored without defaults, so a request id stored then
        still matches its spec."""
        canonical = json.dumps(
            self._as_dict(exclude_defaults=False), sort_keys=True, separators=(",", ":")
        )
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_proto(self) -> jobs_pb2.JobSpec:
        return stored_spec_to_proto(self.to_dict())


def check_stored_size(data: dict[str, Any]) -> None:
    """Bound a spec's stored form (``JobSpec.to_dict``) as the job table keeps it and as a Job
    message carries it, checked before it is stored: a row that GetJob or a ListJobs page
    could not send must never be created."""
    size = len(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode())
    if size > limits.MAX_SPEC_BYTES:
        raise SpecTooLarge(
            "spec", f"is {size} bytes as stored; at most {limits.MAX_SPEC_BYTES} bytes"
        )
    shown = stored_spec_to_proto(data).ByteSize()
    if shown > limits.LIST_RESPONSE_BYTES:
        raise SpecTooLarge(
            "spec",
            f"is {shown} bytes as stored in a Job message; at most "
            f"{limits.LIST_RESPONSE_BYTES} bytes",
        )


def stored_spec_to_proto(data: dict[str, Any]) -> jobs_pb2.JobSpec:
    """A spec as ``JobSpec.to_dict`` wrote it, as the API message, without validating it
    again: showing a stored job costs no parse, and a row stored before a bound existed is
    still shown."""
    operations = []
    for op in data.get("operations", []):
        params = struct_pb2.Struct()
        params.update({name: value for name, value in op.items() if name != "method"})
        operations.append(jobs_pb2.Operation(method=op.get("method", ""), params=params))
    return jobs_pb2.JobSpec(
        api_version=data.get("api_version", API_VERSION),
        base=data.get("base", ""),
        operations=operations,
        gates=dict(data.get("gates", {})),
        alias=data.get("alias") or "",
        timeout_s=data.get("timeout_s", 0.0),
        evaluation=jobs_pb2.EvaluationSettings(**data.get("evaluation", {})),
        keep_failed=bool(data.get("keep_failed", False)),
    )


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "spec"


def _error_field(where: str, error: Any) -> str:
    """The field an operation's validation error names: its location, or for a check across
    fields (a model validator, no location) the ``field:`` its message starts with."""
    if error["loc"]:
        return f"{where}.{_field_path(tuple(error['loc']))}"
    named = MESSAGE_FIELD.match(str(error["msg"]).removeprefix("Value error, "))
    return f"{where}.{named.group(1)}" if named else where


# Per-operation perplexity settings of earlier releases: a job now has one protocol.
MOVED_TO_EVALUATION = ("perplexity_tokens", "perplexity_max_tokens", "perplexity_window")


def _parse_operation(index: int, raw: Any) -> MethodConfig:
    where = f"operations[{index}]"
    if not isinstance(raw, dict):
        raise SpecError(where, "must be a mapping with a 'method' key")
    for key in MOVED_TO_EVALUATION:
        if key in raw:
            raise SpecError(
                f"{where}.{key}",
                "perplexity is measured with one protocol per job: set "
                "evaluation.perplexity_tokens / evaluation.perplexity_window on the spec",
            )
    name = raw.get("method")
    if not isinstance(name, str) or not name:
        raise SpecError(f"{where}.method", "missing method name")
    try:
        config = config_class(name)
    except KeyError as exc:
        raise SpecError(f"{where}.method", str(exc.args[0])) from None
    try:
        return config.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise SpecError(_error_field(where, first), first["msg"]) from None


def check_spec_size(data: dict[str, Any]) -> None:
    """The counts and sizes a spec may have (``limits``), checked before anything is parsed,
    so an oversized spec costs the server one pass over it and is never stored."""
    raw_ops, gates = data.get("operations"), data.get("gates")
    if isinstance(raw_ops, list) and len(raw_ops) > limits.MAX_OPERATIONS:
        raise SpecError(
            "operations", f"at most {limits.MAX_OPERATIONS} operations (got {len(raw_ops)})"
        )
    if isinstance(gates, dict):
        if len(gates) > limits.MAX_GATES:
            raise SpecError("gates", f"at most {limits.MAX_GATES} gates (got {len(gates)})")
        for name, condition in gates.items():
            if len(str(name)) > limits.MAX_GATE_NAME_CHARS:
                raise SpecError(
                    "gates", f"a gate name has at most {limits.MAX_GATE_NAME_CHARS} characters"
                )
            if len(str(condition)) > limits.MAX_GATE_CONDITION_CHARS:
                raise SpecError(
                    f"gates.{name}", f"at most {limits.MAX_GATE_CONDITION_CHARS} characters"
                )
    size = len(json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=str).encode())
    if size > limits.MAX_SPEC_BYTES:
        raise SpecTooLarge(
            "spec", f"is {size} bytes as JSON; at most {limits.MAX_SPEC_BYTES} bytes"
        )


def parse_spec(data: Any) -> JobSpec:
    """Validate a spec given as plain data (from YAML, JSON or the SDK); raises SpecError."""
    if not isinstance(data, dict):
        raise SpecError("spec", "must be a mapping")
    unknown = set(data) - set(JobSpec.model_fields)
    if unknown:
        raise SpecError(sorted(unknown)[0], "unknown field")
    check_spec_size(data)
    raw_ops = data.get("operations")
    if not isinstance(raw_ops, list) or not raw_ops:
        raise SpecError("operations", "must be a non-empty list")
    operations = [_parse_operation(i, raw) for i, raw in enumerate(raw_ops)]
    gates = data.get("gates") or {}
    if not isinstance(gates, dict):
        raise SpecError("gates", "must map metric names to conditions such as '<= 1.05'")
    for name, condition in gates.items():
        try:
            Gate.parse(str(condition))
        except ValueError as exc:
            raise SpecError(f"gates.{name}", str(exc)) from None
    check_gates(gates, operations)
    try:
        return JobSpec.model_validate(
            {**data, "operations": operations, "gates": {k: str(v) for k, v in gates.items()}}
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise SpecError(_field_path(tuple(first["loc"])), first["msg"]) from None


def check_gates(
    gates: dict[str, Any], operations: list[MethodConfig], lineage: set[str] | None = None
) -> None:
    """Every gate names a metric this job can produce (``lineage``: the suite kinds the base's
    ancestors stored; None when not known yet, as on the client)."""
    for name in gates:
        problem = gate_problem(str(name), operations, lineage)
        if problem is not None:
            raise SpecError(f"gates.{name}", problem)


def _params_to_dict(index: int, params: struct_pb2.Struct) -> dict[str, Any]:
    """An operation's params as plain data; a Struct may hold NaN or infinity, JSON cannot."""
    try:
        return json_format.MessageToDict(params)
    except (json_format.Error, ValueError) as exc:
        raise SpecError(
            f"operations[{index}]", f"params must be finite JSON values: {exc}"
        ) from None


def spec_from_proto(message: jobs_pb2.JobSpec) -> JobSpec:
    # A cheap first bound before any conversion: a spec's protobuf is at most a few times its
    # JSON (a number is 9 bytes there); parse_spec then bounds the JSON itself.
    if message.ByteSize() > 4 * limits.MAX_SPEC_BYTES:
        raise SpecTooLarge(
            "spec",
            f"is {message.ByteSize()} bytes on the wire; a spec may be at most "
            f"{limits.MAX_SPEC_BYTES} bytes as JSON",
        )
    if len(message.operations) > limits.MAX_OPERATIONS:
        raise SpecError(
            "operations",
            f"at most {limits.MAX_OPERATIONS} operations (got {len(message.operations)})",
        )
    data: dict[str, Any] = {
        "api_version": message.api_version or API_VERSION,
        "base": message.base,
        "operations": [
            {"method": op.method, **_params_to_dict(index, op.params)}
            for index, op in enumerate(message.operations)
        ],
        "gates": dict(message.gates),
    }
    if message.alias:
        data["alias"] = message.alias
    if message.timeout_s:
        data["timeout_s"] = message.timeout_s
    if message.keep_failed:
        data["keep_failed"] = True
    evaluation = {
        name: value
        for name, value in (
            ("perplexity_tokens", message.evaluation.perplexity_tokens),
            ("perplexity_window", message.evaluation.perplexity_window),
        )
        if value
    }
    if evaluation:
        data["evaluation"] = evaluation
    return parse_spec(data)


def spec_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a spec file: ``operations`` items are a union of every
    registered method's config, told apart by ``method``, each with its own fields only."""
    configs = list(method_configs().values())
    operation = Annotated[functools.reduce(operator.or_, configs), Field(discriminator="method")]
    described = create_model(
        "JobSpec",
        __base__=JobSpec,
        __doc__=JobSpec.__doc__,
        operations=(list[operation], Field(min_length=1)),  # type: ignore[valid-type]
    )
    schema = described.model_json_schema()
    for config in configs:
        definition = schema["$defs"][config.__name__]
        required = definition.setdefault("required", [])
        if "method" not in required:
            required.insert(0, "method")
        for name, text in field_descriptions(config).items():
            if text and name in definition["properties"]:
                definition["properties"][name].setdefault("description", text)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


class WrittenFloat(float):
    """A number a YAML spec wrote with a decimal point, keeping its text: ``heads: [7.10]``
    is head 10 of layer 7, which the float 7.1 alone cannot tell from head 1."""

    text: str

    def __new__(cls, value: float, text: str) -> WrittenFloat:
        number = super().__new__(cls, value)
        number.text = text
        return number


class SpecLoader(yaml.SafeLoader):
    """YAML read as spec authors mean it: a mapping key ``true`` / ``false`` (``yes``, ``no``,
    ``on``, ``off``) stays the text it is (an ITI record's ``true:`` answers, not the boolean
    True), and a float keeps its text (``WrittenFloat``)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag == _YAML_BOOL:
                key.tag = _YAML_STR
        return super().construct_mapping(node, deep=deep)

    def construct_written_float(self, node: yaml.ScalarNode) -> float:
        value = self.construct_yaml_float(node)
        return WrittenFloat(value, str(node.value))


_YAML_BOOL, _YAML_STR = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:str"
SpecLoader.add_constructor("tag:yaml.org,2002:float", SpecLoader.construct_written_float)


def load_spec_file(path: str | Path) -> JobSpec:
    """Read a YAML (or JSON) spec file (``SpecLoader``)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = yaml.load(text, Loader=SpecLoader)
    except yaml.YAMLError as exc:
        raise SpecError("spec", f"{path} is not valid YAML: {exc}") from None
    return parse_spec(data)
