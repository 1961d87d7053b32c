"""The ``concept_bottleneck`` job config (torch-free: the thin client validates it)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from modelsurgery.editing.registry import MethodConfig
from modelsurgery.proto import limits

CEBAB_TRAIN = "cebab/train_exclusive.json"
CEBAB_DEV = "cebab/dev.json"
CEBAB_CONCEPTS = ("food", "ambiance", "service", "noise")
# Every concept takes one of these values (CEBaB's aspect labels); the label is 1..5 stars.
CONCEPT_VALUES = ("Negative", "Positive", "unknown")
MAX_CONCEPTS = 32
MAX_LABELS = 64
# What the label head reads of each concept head.
LabelInput = Literal["probabilities", "logits"]


class ConceptBottleneckConfig(MethodConfig):
    """Concept subnetworks (SparseCBM, Tan et al. AAAI 2024): K binary masks (one per concept)
    over the linear weights of the chosen decoder layers. Concept k's pass uses W * M_k, is
    mean-pooled over tokens and read by concept k's head (Negative / Positive / unknown); a
    label head maps the concept probabilities [c_1 .. c_K] (``label_input``) to the task label (a
    joint concept bottleneck). Loss = CE(label) + lambda * sum_k CE(concept k); from the
    second epoch on each concept's mask is recomputed from the dense weights by saliency,
    sparsity rising linearly to ``sparsity`` in the last epoch. The layers below the lowest
    chosen one are frozen and run once. The base weights are left as they are: the trained
    layers, masks and heads are stored with the version and attach through the registry (a
    leaf, like ReFT).

    Metrics (on the evaluation split: CEBaB ``dev.json``, or the held-out part of an
    examples file): ``task_accuracy``, ``task_macro_f1``, ``concept_accuracy_<name>`` and
    ``concept_accuracy_mean``, ``mask_density``, ``mask_overlap_layer<i>`` (mean pairwise
    Jaccard overlap of the concept masks), ``train_seconds``, ``train_examples``,
    ``eval_examples``; with ``compare_dense`` the same task and concept figures of a dense
    CBM trained in the same job, prefixed ``dense_``.
    """

    method: Literal["concept_bottleneck"] = "concept_bottleneck"
    data_file_fields: ClassVar[tuple[str, ...]] = ("examples_file",)
    dataset: Literal["cebab"] | None = Field(
        default=None,
        description="A shipped data set to train on: 'cebab' (CEBaB train_exclusive.json, "
        "evaluated on dev.json). Give this or examples_file.",
    )
    examples_file: str | None = Field(
        default=None,
        description='JSONL under a data root, one {"text", "label", "concepts": {name: value}} '
        "per line (values Negative/Positive/unknown; a missing concept is not trained on). "
        "A seeded eval_fraction of it is held out for the metrics.",
    )
    concepts: list[str] = Field(
        default=list(CEBAB_CONCEPTS),
        min_length=1,
        max_length=MAX_CONCEPTS,
        description="Concept names, one mask and one head each (CEBaB: food, ambiance, "
        "service, noise).",
    )
    sparsity: float = Field(
        default=0.7,
        ge=0.0,
        lt=1.0,
        description="Final fraction of each masked weight matrix a concept's mask removes.",
    )
    layers: list[int] | None = Field(
        default=None,
        description="Decoder layers whose linear weights carry the concept masks and are "
        "trained; default the top two. The layers below the lowest run once, frozen.",
    )
    saliency: Literal["fisher", "magnitude"] = Field(
        default="fisher",
        description="How masks are recomputed: 'fisher' = w^2 * E[g^2] / 2 with g the "
        "gradient of that concept's loss (diagonal empirical Fisher, oBERT's CPU form); "
        "'magnitude' = |w| (the same mask for every concept).",
    )
    fisher_batches: int = Field(
        default=16,
        ge=1,
        le=10_000,
        description="Batches whose concept-loss gradients estimate the Fisher at each mask update.",
    )
    epochs: int = Field(default=3, ge=1, le=limits.MAX_EPOCHS, description="Training epochs.")
    lambda_: float = Field(
        default=5.0,
        ge=0.0,
        alias="lambda",
        description="Weight of the summed concept losses against the label loss.",
    )
    label_input: LabelInput = Field(
        default="probabilities",
        description="What the label head reads of each concept head: its softmax "
        "'probabilities' (a strict bottleneck; intervention moves the label) or its 'logits' "
        "(the paper's code: the heads' scale leaks more of the text to the label, and an "
        "intervention's mask swap moves that scale too; see docs/concepts.md).",
    )
    lr: float = Field(default=1e-2, gt=0.0, description="AdamW learning rate of the heads.")
    backbone_lr: float = Field(
        default=1e-4, ge=0.0, description="AdamW learning rate of the masked layers' weights."
    )
    batch_size: int = Field(
        default=16, ge=1, le=limits.MAX_BATCH_SIZE, description="Texts per training step."
    )
    max_tokens: int = Field(
        default=64,
        ge=2,
        le=limits.MAX_SEQUENCE_TOKENS,
        description="Each text is cut to its first max_tokens tokens.",
    )
    train_limit: int | None = Field(
        default=None,
        ge=1,
        description="Train on at most this many examples (a seeded subset); all by default.",
    )
    eval_limit: int | None = Field(
        default=None,
        ge=1,
        description="Evaluate on at most this many examples (a seeded subset); all by default.",
    )
    eval_fraction: float = Field(
        default=0.2,
        gt=0.0,
        lt=1.0,
        description="Share of an examples_file held out for the metrics (CEBaB uses dev.json).",
    )
    compare_dense: bool = Field(
        default=False,
        description="Also train a dense joint CBM on the same data and report its figures "
        "(dense_*) beside the sparse one's.",
    )
    seed: int = Field(default=0, description="Seed of initialisation, subsets and shuffling.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def metric_names(self) -> set[str]:
        task = {"task_accuracy", "task_macro_f1", "concept_accuracy_mean"}
        task |= {f"concept_accuracy_{name}" for name in self.concepts}
        names = set(task) | {"mask_density", "train_seconds", "train_examples", "eval_examples"}
        if self.compare_dense:
            names |= {f"dense_{name}" for name in task}
        return names

    @field_validator("concepts")
    @classmethod
    def _unique_concepts(cls, value: list[str]) -> list[str]:
        for i, name in enumerate(value):
            if not name or not name.replace("_", "").isalnum():
                raise ValueError(f"concepts[{i}]: use letters, digits and '_' only")
            if value.index(name) != i:
                raise ValueError(f"concepts[{i}]: {name!r} is listed twice")
        return value

    @field_validator("layers")
    @classmethod
    def _unique_layers(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("layers: the list is empty")
        for i, layer in enumerate(value):
            if layer < 0:
                raise ValueError(f"layers[{i}]: layer {layer} is negative")
            if value.index(layer) != i:
                raise ValueError(f"layers[{i}]: layer {layer} is listed twice")
        return sorted(value)

    @model_validator(mode="after")
    def _one_data_source(self) -> ConceptBottleneckConfig:
        if (self.dataset is None) == (self.examples_file is None):
            raise ValueError("dataset: give exactly one of 'dataset' and 'examples_file'")
        if self.dataset == "cebab":
            unknown = [name for name in self.concepts if name not in CEBAB_CONCEPTS]
            if unknown:
                raise ValueError(
                    f"concepts: CEBaB has no concept {unknown[0]!r} "
                    f"(it has {', '.join(CEBAB_CONCEPTS)})"
                )
        return self

    def shared_data(self) -> dict[str, tuple[str, ...]]:
        return {"dataset": (CEBAB_TRAIN, CEBAB_DEV)} if self.dataset == "cebab" else {}

    def leaves_hooks(self, model_config: Any) -> bool:
        return True

    def resolved(self, model_config: Any) -> ConceptBottleneckConfig:
        """The default layers (the top two) filled in from the model."""
        if self.layers is not None:
            return self
        count = _num_layers(model_config)
        if count is None:
            return self
        return self.model_copy(update={"layers": list(range(max(0, count - 2), count))})

    def check_against(self, model_config: Any) -> None:
        count = _num_layers(model_config)
        for i, layer in enumerate(self.layers or ()):
            if count is not None and layer >= count:
                raise ValueError(f"layers[{i}]: layer {layer} out of range (model has {count})")


def _num_layers(model_config: Any) -> int | None:
    for name in ("num_hidden_layers", "n_layer"):
        value = getattr(model_config, name, None)
        if isinstance(value, int):
            return value
    return None
