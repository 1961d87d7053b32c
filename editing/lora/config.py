"""The ``lora`` job config: where the adapter goes, what it learns from, and how it ends up."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from modelsurgery.editing.examples import Example
from modelsurgery.editing.knowledge.config import default_memit_layers, layer_count
from modelsurgery.editing.knowledge.facts import Fact
from modelsurgery.editing.knowledge.templates import DEFAULT_CONTEXT_TEMPLATES
from modelsurgery.editing.registry import DtypeSetting, MethodConfig
from modelsurgery.editing.validators import one_slot_templates, unique_layers
from modelsurgery.evaluation.metrics import FACTS
from modelsurgery.proto import limits

Objective = Literal["facts", "examples", "text"]

# Per-objective defaults for every hyperparameter left None. ``facts`` starts from EasyEdit's
# LoRA edit baseline (rank 8, alpha 32, dropout 0.1) but adapts only the MLP output
# projections of the layers MEMIT edits (``targets.default_targets``), with lr 1e-3, 10 epochs
# and KL weight 5: chosen on CounterFact dev cases 5000-5009 with KL on disjoint prompts
# (q/v on every layer at lr 5e-3 took perplexity to 6.8x; see benchmarks/lora.py). ``text``
# follows LLM-Pruner's recovery tune (rank 8, alpha 16, dropout 0.05, every attention and MLP
# projection) with a larger learning rate for a budget of minutes.
OBJECTIVE_DEFAULTS: dict[Objective, dict[str, Any]] = {
    "facts": {
        "alpha": 32.0,
        "dropout": 0.1,
        "lr": 1e-3,
        "epochs": 10,
        "batch_size": 8,
        "kl_factor": 5.0,
    },
    "examples": {"alpha": 16.0, "dropout": 0.05, "lr": 1e-3, "epochs": 5, "batch_size": 4},
    "text": {"alpha": 16.0, "dropout": 0.05, "lr": 1e-3, "epochs": 1, "batch_size": 4},
}


class LoraEditConfig(MethodConfig):
    """LoRA (Hu et al. 2021) through peft: W' = W + (alpha / rank) B A on the chosen linear
    modules of the chosen layers; only A and B train, the base stays frozen.

    Data, exactly one of:
      - ``facts``: CounterFact records (constrained fine-tuning, EasyEdit's FT-L / LoRA edit
        baseline): NLL of ``target_new`` after the prompt (also under each of
        ``context_templates``) plus ``kl_factor`` * KL(base || edited) of the next-token
        distributions on ``kl_prompts`` (default: the facts' locality prompts, which makes the
        reported ``locality`` in-sample; give prompts disjoint from the judged ones for an
        honest figure). The facts are the version's evaluation suite, as for ROME.
      - ``examples`` / ``examples_file``: ``{prompt, completion}`` pairs, loss on the
        completion only (the file is JSONL under a data root).
      - ``text``: language modelling on a text file: a path under a data root or a shared data
        set such as ``wikitext-2/valid.tokens`` (a ``.jsonl`` file reads its ``text`` fields);
        ``text_samples`` random windows of ``text_window`` tokens, seeded.
    target_modules: leaf module names (peft's convention: ``q_proj``, ``down_proj``, ``c_attn``
        ...); default every attention and MLP projection of the family, and for ``facts`` the
        MLP output projection (where ROME and MEMIT write facts).
    layers: decoder layers to adapt; default all, and for ``facts`` the family's MEMIT layers
        (2-8 of SmolLM2-135M's 30).
    merge: True merges B A into the weights (the version stores only the changed tensors and
        exports plain weights); False keeps a peft adapter, which exports as a peft adapter
        folder (``adapter_config.json`` + ``adapter_model.safetensors``, loaded onto the base
        with ``PeftModel.from_pretrained``); such a version is a leaf and ``lora`` runs last
        in its job.
    alpha, dropout, lr, epochs, batch_size, kl_factor: None takes ``OBJECTIVE_DEFAULTS`` of the
        objective. The version records every defaulted value.
    train_dtype: the forward passes of training run in bfloat16 autocast where bf16 matmuls are
        fast on the device (``auto``: CUDA with bf16, a CPU with AMX or AVX-512-BF16), else in
        float32; A and B stay float32 either way. The version records the resolved value.

    Metrics: ``initial_loss``, ``final_loss`` (the objective's mean NLL over its training
    data, at most ``LOSS_ITEMS`` = 64 sequences of it, dropout off), ``trainable_parameters``,
    ``train_steps``, ``train_seconds``, and ``perplexity_before`` / ``perplexity_after`` /
    ``perplexity_ratio`` (WikiText-2 test, when ``evaluate_perplexity``).
    """

    method: Literal["lora"] = "lora"
    data_file_fields: ClassVar[tuple[str, ...]] = ("examples_file",)
    text_source_fields: ClassVar[tuple[str, ...]] = ("text",)
    facts: list[Fact] | None = Field(
        default=None,
        max_length=limits.MAX_LORA_FACTS,
        description="CounterFact records to write (constrained fine-tuning); one data source of "
        "three.",
    )
    examples: list[Example] | None = Field(
        default=None,
        max_length=limits.MAX_EXAMPLES,
        description="Inline {prompt, completion} pairs; the loss is on the completion only.",
    )
    examples_file: str | None = Field(
        default=None,
        description="JSONL of {prompt, completion} pairs under the server's data roots.",
    )
    text: str | None = Field(
        default=None,
        description="A text file to model (under a data root, or a shared data set such as "
        "wikitext-2/valid.tokens).",
    )
    target_modules: list[str] | None = Field(default=None, min_length=1)
    layers: list[int] | None = Field(default=None, min_length=1)
    rank: int = Field(
        default=8, ge=1, le=limits.MAX_RANK, description="Rank of the adapters' A and B."
    )
    alpha: float | None = Field(default=None, gt=0)
    dropout: float | None = Field(default=None, ge=0.0, lt=1.0)
    lr: float | None = Field(default=None, gt=0)
    epochs: int | None = Field(default=None, ge=1, le=limits.MAX_EPOCHS)
    batch_size: int | None = Field(default=None, ge=1, le=limits.MAX_BATCH_SIZE)
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay.")
    max_length: int = Field(
        default=256,
        ge=2,
        le=limits.MAX_SEQUENCE_TOKENS,
        description="Longest training sequence in tokens.",
    )
    kl_factor: float | None = Field(default=None, ge=0.0)
    kl_prompts: list[str] | None = Field(
        default=None,
        max_length=limits.MAX_PROMPT_LIST,
        description="Prompts the KL term keeps unchanged with facts (default: the facts' "
        "locality prompts).",
    )
    context_templates: list[str] | None = Field(
        description="Prefixes (each with one {}) the facts are also trained under.",
        default=None,
        min_length=1,
        max_length=limits.MAX_CONTEXT_TEMPLATES,
    )
    text_samples: int = Field(
        default=256,
        ge=1,
        le=limits.MAX_TEXT_SAMPLES,
        description="Random windows of the text to train on (seeded).",
    )
    text_window: int = Field(
        default=256, ge=2, le=limits.MAX_SEQUENCE_TOKENS, description="Tokens per text window."
    )
    merge: bool = True
    train_dtype: DtypeSetting = "auto"
    evaluate_perplexity: bool = Field(
        default=True,
        description="Measure WikiText-2 perplexity before and after (the job's protocol).",
    )
    seed: int = Field(default=0, description="Seed of initialisation, shuffling and text windows.")

    carries: ClassVar[frozenset[str]] = frozenset({FACTS})

    @model_validator(mode="after")
    def _one_data_source(self) -> LoraEditConfig:
        given = [
            name
            for name in ("facts", "examples", "examples_file", "text")
            if getattr(self, name) is not None
        ]
        if len(given) != 1:
            field = given[1] if len(given) > 1 else "facts"
            raise ValueError(
                f"{field}: give exactly one of 'facts', 'examples', 'examples_file' and 'text'"
                + (f" (got {', '.join(given)})" if given else "")
            )
        for name in ("facts", "examples"):
            if getattr(self, name) == []:
                raise ValueError(f"{name}: the list is empty")
        if self.objective != "facts":
            for name in ("kl_prompts", "context_templates", "kl_factor"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: only used with 'facts'")
        return self

    _unique_layers = field_validator("layers")(unique_layers)

    _one_slot = field_validator("context_templates")(one_slot_templates)

    @property
    def objective(self) -> Objective:
        if self.facts is not None:
            return "facts"
        return "text" if self.text is not None else "examples"

    def setting(self, name: str) -> Any:
        """A hyperparameter as run: the spec's value, else the objective's default."""
        value = getattr(self, name)
        return OBJECTIVE_DEFAULTS[self.objective][name] if value is None else value

    def templates(self) -> tuple[str, ...]:
        """The context templates fact prompts train under."""
        return tuple(self.context_templates or DEFAULT_CONTEXT_TEMPLATES)

    def resolved(self, model_config: Any) -> LoraEditConfig:
        """Every hyperparameter as ``run`` picks it, and the layers it adapts: for ``facts``
        the family's MEMIT layers, else all. ``target_modules`` stays unset when not given:
        its default is the family's module names, which live beside torch."""
        update = {name: self.setting(name) for name in OBJECTIVE_DEFAULTS[self.objective]}
        if self.objective == "facts":
            update["context_templates"] = list(self.templates())
        if self.layers is None:
            depth = layer_count(model_config)
            update["layers"] = list(range(depth))
            if self.objective == "facts":
                model_type = getattr(model_config, "model_type", None)
                update["layers"] = default_memit_layers(model_type, depth)
        return self.model_copy(update=update)

    def resolved_settings(self) -> dict[str, Any]:
        """The defaulted hyperparameters, recorded in the version's operation config."""
        return {
            name: self.setting(name)
            for name in OBJECTIVE_DEFAULTS[self.objective]
            if getattr(self, name) is None
        }

    def suite(self) -> dict[str, list[dict[str, Any]]]:
        if self.facts is None:
            return {}
        return {FACTS: [f.model_dump(mode="json", exclude_none=True) for f in self.facts]}

    def metric_names(self) -> set[str]:
        names = {"initial_loss", "final_loss", "trainable_parameters", "train_steps"}
        names.add("train_seconds")
        return names

    def leaves_hooks(self, model_config: Any) -> bool:
        return not self.merge

    def check_against(self, model_config: Any) -> None:
        from modelsurgery.editing.lora.targets import check_targets

        check_targets(model_config, self.target_modules, self.layers)
