"""Config fields shared by ROME and MEMIT, and the per-family hyperparameter defaults.

Every hyperparameter left ``None`` in a job spec takes its family default (``FAMILY_DEFAULTS``
keyed by HF ``model_type``; layers are fractions of depth so one entry fits every size). The
Llama entry was chosen by measurement on SmolLM2-135M (30 layers) with CounterFact dev cases,
see ``benchmarks/counterfact.py`` and the ROME/MEMIT config docstrings.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from modelsurgery.editing.registry import DtypeSetting, MethodConfig
from modelsurgery.editing.validators import one_slot_templates
from modelsurgery.evaluation.metrics import FACT_METRICS, FACTS
from modelsurgery.proto import limits

from .easyedit import from_easyedit, is_easyedit, schema_with_easyedit_keys
from .facts import Fact
from .templates import DEFAULT_CONTEXT_TEMPLATES

if TYPE_CHECKING:
    from .stats import StatsSettings
    from .vstar import VStarParams


@dataclass(frozen=True)
class FamilyDefaults:
    rome_layer: float
    memit_layers: tuple[float, float]
    v_steps: int = 25
    v_lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    rome_clamp: float = 4.0
    memit_clamp: float = 0.75
    mom2_weight: float = 15000.0
    nullspace_threshold: float = 2.0
    nullspace_l2: float = 10.0


# Llama (SmolLM2-135M, 30 layers): ROME layer 5; MEMIT layers 2-8 with v* clamp 4 (EasyEdit's
# Llama value) and lambda 5000, chosen on CounterFact dev cases 1000-1199 (200 facts in one
# batch, v* targets fixed, see the MemitConfig docstring for the sweep).
_LLAMA = FamilyDefaults(
    rome_layer=0.17,
    memit_layers=(0.07, 0.27),
    weight_decay=1e-3,
    memit_clamp=4.0,
    mom2_weight=5000.0,
)
# Null-space projection (all families): cut 2 x C's median eigenvalue, ridge 10, lambda * C kept
# inside; chosen on CounterFact dev cases 9000-9099 as one 100-fact MEMIT batch, v* targets
# fixed (``benchmarks/memit_sweep.py``), see the MemitConfig docstring.
# GPT-2 XL: ROME layer 17 of 48, MEMIT 13-17 (Meng et al.); GPT-J: ROME 5 of 28, MEMIT 3-8.
_GPT2 = FamilyDefaults(rome_layer=0.35, memit_layers=(0.27, 0.35), mom2_weight=20000.0)
_GPTJ = FamilyDefaults(rome_layer=0.18, memit_layers=(0.11, 0.29))

FAMILY_DEFAULTS: dict[str, FamilyDefaults] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "phi": _LLAMA,
    "gpt2": _GPT2,
    "gpt_neox": _GPT2,
    "opt": _GPT2,
    "gptj": _GPTJ,
}


def family_defaults(model_type: str | None) -> FamilyDefaults:
    return FAMILY_DEFAULTS.get(model_type or "", _LLAMA)


def layer_count(model_config: Any) -> int:
    for name in ("num_hidden_layers", "n_layer"):
        value = getattr(model_config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError("model config has no layer count")


def depth_layer(fraction: float, num_layers: int) -> int:
    return min(num_layers - 1, max(0, round(fraction * num_layers)))


def default_memit_layers(model_type: str | None, num_layers: int) -> list[int]:
    """The family's MEMIT layer range at this depth (MEMIT's and fact LoRA's default)."""
    first, last = (depth_layer(f, num_layers) for f in family_defaults(model_type).memit_layers)
    return list(range(first, last + 1))


def key_width(model_config: Any) -> int | None:
    """Width of an MLP down projection's input (its keys): the MLP's inner width (GPT-2's
    default: 4 x hidden), or None when the config does not say."""
    for name in ("intermediate_size", "n_inner", "ffn_dim"):
        value = getattr(model_config, name, None)
        if isinstance(value, int):
            return value
    hidden = getattr(model_config, "hidden_size", getattr(model_config, "n_embd", None))
    return 4 * hidden if isinstance(hidden, int) else None


# Facts one edited layer holds, as a share of its key width (see ``spread_layers``).
FACTS_PER_KEY = 0.5
# The deepest a spread range reaches, as a fraction of depth.
DEEPEST_SPREAD = 0.6


def spread_layers(layers: list[int], facts: int, model_config: Any) -> list[int]:
    """``layers`` extended upward when ``facts`` outnumber what they hold: a layer's update
    is fitted to its keys [F, in] under lambda * C, and the fit degrades as F nears the key
    width (F keys in ``in`` dimensions leave the update no room that C does not penalise), so
    each layer is given at most ``FACTS_PER_KEY * key width`` facts (SmolLM2-135M: 768, so
    7 layers hold 5,376 facts and 10,000 take 14). Consecutive layers from the range's first,
    no deeper than ``DEEPEST_SPREAD`` of the model; unchanged when the width is unknown."""
    width = key_width(model_config)
    if width is None:
        return list(layers)
    needed = -(-facts // max(1, int(FACTS_PER_KEY * width)))
    if needed <= len(layers):
        return list(layers)
    deepest = max(layers[-1], depth_layer(DEEPEST_SPREAD, layer_count(model_config)))
    return list(range(layers[0], min(layers[0] + needed - 1, deepest) + 1))


def ascending_layers(value: list[int] | None) -> list[int] | None:
    """A multi-layer edit's ``layers`` validator: strictly ascending, or unset."""
    if value is not None:
        for i, (a, b) in enumerate(pairwise(value)):
            if b <= a:
                raise ValueError(f"layers[{i + 1}]: layers must be strictly ascending")
    return value


def multi_layer_edit_layers(layers: list[int] | None, facts: int, model_config: Any) -> list[int]:
    """The spec's layers, else the family's MEMIT range spread for this many facts."""
    if layers is not None:
        return list(layers)
    model_type = getattr(model_config, "model_type", None)
    default = default_memit_layers(model_type, layer_count(model_config))
    return spread_layers(default, facts, model_config)


def check_layer(field: str, layer: int, num_layers: int) -> None:
    if not 0 <= layer < num_layers:
        raise ValueError(f"{field}: layer {layer} out of range (model has {num_layers} layers)")


class KnowledgeEditConfig(MethodConfig):
    """Fields shared by ``rome`` and ``memit`` (hyperparameters: None = family default).
    EasyEdit hparams keys (``layers``, ``v_num_grad_steps``, ``clamp_norm_factor``,
    ``mom2_update_weight`` ...) are accepted too and become these fields (``easyedit``).

    facts: CounterFact-style records (see ``Fact``).
    v_steps, v_lr: Adam steps and learning rate of the v* optimisation.
    kl_factor: weight of KL(edited || original) on "{subject} is a" at the subject.
    weight_decay: weight of ||delta|| / ||original output||^2.
    clamp_factor: max ||delta|| as a multiple of the original output's norm.
    early_stop_loss: a fact stops optimising once its loss is below this.
    stop_when_most_probable: a fact also stops once each answer token of each of its templated
        prompts is the most probable token there (ENCORE's early stopping).
    context_templates: prefixes (each with one ``{}`` for the prompt) keys and v* average over;
        default: a fixed set of generic prefixes (deterministic, see ``templates``).
    stats_samples, stats_window, stats_seed: WikiText-2 validation windows for C = E[k k^T].
    projection: ``none`` (the paper's update), ``null_space`` (AlphaEdit: the update acts
        only on key directions the preserved knowledge does not use, and keeps the keys of
        every earlier edit in the lineage; see ``nullspace``), or ``auto``: ``null_space`` for
        a layer that carries earlier edits' keys (sequential editing), else ``none``.
    nullspace_threshold: with ``null_space``, the eigenvalue cut of C = E[k k^T], as a multiple
        of C's median eigenvalue (directions below it form the null space; 1 = half of them).
    nullspace_l2: with ``null_space``, the ridge on the update, in units of C's median
        eigenvalue.
    nullspace_mom2: with ``null_space``, keep lambda * C (``mom2_weight``; ROME: the family's)
        on the preserved keys' share left inside the null space (a real model's C has no
        exact null space); off = AlphaEdit's update exactly.
    vstar_dtype: the dtype v* is optimised in (on a copy of the model; keys, outputs and the
        update stay in the model's dtype); ``auto`` = bfloat16 where its matmuls are fast
        (``models.hardware``), else float32. Recorded resolved in the version's config.
    evaluate: compute efficacy/paraphrase/locality/probability_gain before and after.
    evaluate_perplexity: WikiText-2 perplexity before/after with the job's protocol
        (``perplexity_before``, ``perplexity_after``, ``perplexity_ratio``).
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, json_schema_extra=schema_with_easyedit_keys
    )

    facts: list[Fact] = Field(min_length=1)
    v_steps: int | None = Field(default=None, ge=1, le=limits.MAX_OPTIMISATION_STEPS)
    v_lr: float | None = Field(default=None, gt=0)
    kl_factor: float | None = Field(default=None, ge=0)
    weight_decay: float | None = Field(default=None, ge=0)
    clamp_factor: float | None = Field(default=None, gt=0)
    early_stop_loss: float = Field(default=0.05, ge=0)
    stop_when_most_probable: bool = False
    context_templates: list[str] | None = Field(
        default=None, min_length=1, max_length=limits.MAX_CONTEXT_TEMPLATES
    )
    stats_samples: int = Field(default=256, ge=1, le=limits.MAX_STATISTICS_SAMPLES)
    stats_window: int = Field(default=256, ge=8, le=limits.MAX_SEQUENCE_TOKENS)
    stats_seed: int = 0
    projection: Literal["auto", "none", "null_space"] = "auto"
    nullspace_threshold: float | None = Field(default=None, gt=0)
    nullspace_l2: float | None = Field(default=None, gt=0)
    nullspace_mom2: bool = True
    vstar_dtype: DtypeSetting = "auto"
    # EasyEdit's layer whose output the v* loss reads: ours is always the last (the logits).
    v_loss_layer: int | None = None
    evaluate: bool = True
    evaluate_perplexity: bool = True

    carries: ClassVar[frozenset[str]] = frozenset({FACTS})

    @model_validator(mode="before")
    @classmethod
    def _easyedit_hparams(cls, values: Any) -> Any:
        """An operation written with EasyEdit's hparams keys becomes our fields."""
        if not isinstance(values, dict):
            return values
        method = values.get("method") or cls.model_fields["method"].default
        return from_easyedit(method, values) if is_easyedit(method, values) else values

    def check_v_loss_layer(self, model_config: Any) -> None:
        """``v_loss_layer`` (EasyEdit) is honoured when it is the last layer, where our v*
        loss is read; another layer would change what v* optimises."""
        last = layer_count(model_config) - 1
        if self.v_loss_layer is not None and self.v_loss_layer not in (last, -1):
            raise ValueError(
                f"v_loss_layer: the v* loss is read at the last layer ({last}) here; "
                f"{self.v_loss_layer} cannot be honoured (write {last} or leave it out)"
            )

    def suite(self) -> dict[str, list[dict[str, Any]]]:
        """The facts, for the job-level evaluation and every later lineage check."""
        return {FACTS: [f.model_dump(mode="json", exclude_none=True) for f in self.facts]}

    def metric_names(self) -> set[str]:
        names = {"v_loss", "v_steps_used"}
        if self.evaluate:
            names |= set(FACT_METRICS)
        return names

    _one_slot = field_validator("context_templates")(one_slot_templates)

    def templates(self) -> tuple[str, ...]:
        return tuple(self.context_templates or DEFAULT_CONTEXT_TEMPLATES)

    def stats_settings(self) -> StatsSettings:
        from .stats import StatsSettings

        return StatsSettings(self.stats_samples, self.stats_window, self.stats_seed)

    def projects(self, earlier_edits: int) -> bool:
        """Whether a layer's update is null-space projected, given how many earlier edits'
        keys the layer carries."""
        return self.projection == "null_space" or (self.projection == "auto" and earlier_edits > 0)

    def projection_settings(self, defaults: FamilyDefaults) -> tuple[float, float]:
        """(eigenvalue threshold, ridge) of a null-space projected edit."""
        threshold = self.nullspace_threshold or defaults.nullspace_threshold
        return threshold, self.nullspace_l2 or defaults.nullspace_l2

    def vstar_settings(self, defaults: FamilyDefaults, clamp: float) -> dict[str, Any]:
        """The v* fields as run: the spec's value, else the family's (``clamp`` is the
        method's clamp default)."""
        chosen = {
            "v_steps": defaults.v_steps,
            "v_lr": defaults.v_lr,
            "kl_factor": defaults.kl_factor,
            "weight_decay": defaults.weight_decay,
            "clamp_factor": clamp,
        }
        return {
            name: default if getattr(self, name) is None else getattr(self, name)
            for name, default in chosen.items()
        }

    def vstar_params(self, defaults: FamilyDefaults, clamp: float) -> VStarParams:
        from .vstar import VStarParams

        settings = self.vstar_settings(defaults, clamp)
        return VStarParams(
            steps=settings["v_steps"],
            lr=settings["v_lr"],
            kl_factor=settings["kl_factor"],
            weight_decay=settings["weight_decay"],
            clamp_factor=settings["clamp_factor"],
            early_stop_loss=self.early_stop_loss,
            stop_when_most_probable=self.stop_when_most_probable,
        )

    def shared_settings(self, defaults: FamilyDefaults, clamp: float) -> dict[str, Any]:
        """Every shared field ``run`` fills from the family defaults, for ``resolved``;
        ``projection`` and ``vstar_dtype`` are decided while running and reported then."""
        threshold, ridge = self.projection_settings(defaults)
        return {
            **self.vstar_settings(defaults, clamp),
            "context_templates": list(self.templates()),
            "nullspace_threshold": threshold,
            "nullspace_l2": ridge,
        }
