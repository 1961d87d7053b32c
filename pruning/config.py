"""The `prune` method's config: what to remove, how to score it, and what to measure."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from modelsurgery.editing.knowledge.config import layer_count
from modelsurgery.editing.registry import DtypeSetting, MethodConfig
from modelsurgery.proto import limits

if TYPE_CHECKING:
    from modelsurgery.models.adapters import FamilyLayout

Score = Literal["wanda", "magnitude", "activation", "ria"]
Refit = Literal["none", "sparsegpt"]
RefitInputs = Literal["pruned", "dense"]
# The unstructured / N:M defaults, chosen per kind on WikiText-2 validation text over both
# models (docs/pruning.md, "Every row, and the peers"): the score's mask chosen block by block
# while the kept weights are refitted (SparseGPT's OBS update).
DEFAULT_SPARSE_SCORE: dict[str, Score] = {"unstructured": "wanda", "nm": "ria"}
DEFAULT_SPARSE_REFIT: Refit = "sparsegpt"
# The refit's inputs inside a layer, chosen on dev text (docs/pruning.md): a pass per group on
# the pruned modules before it; one dense pass per layer is faster but worse on dev at 50% and
# 70% on SmolLM2 and at 2:4 on Gemma-3-270M (better by 3% at 2:4 on SmolLM2).
DEFAULT_REFIT_INPUTS: RefitInputs = "pruned"


class PruneConfig(MethodConfig):
    """Prune a causal LM from calibration activations.

    kind:
      - ``structured``: physically remove MLP intermediate neurons (gate/up rows + down columns,
        fc_in/fc_out for GPT-2 style) and optionally whole KV head groups; the model gets smaller.
      - ``unstructured``: zero the lowest-scored ``ratio`` of weights in each output row of every
        decoder-block linear layer; the checkpoint stays dense (stored as bitmask + values).
      - ``nm``: N:M semi-structured sparsity, ``n`` zeros in every group of ``m`` consecutive
        inputs of each row (2:4, 4:8).
    score: ``wanda`` (|W| * ||X||_2 per input; for neurons sqrt(E[h^2]) * ||W_down[:, j]||, or
      std(h) * ||W_down[:, j]|| with bias compensation, the error left after the mean is kept),
      ``ria`` (unstructured / N:M: (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) *
      ||X_j||_2^0.5), ``magnitude`` (|W|; for neurons the norm of the neuron's rows and column),
      ``activation`` (structured only: E|h| * ||W_down[:, j]||, h = act(gate) * up).
    refit (unstructured / N:M): ``sparsegpt`` refits the kept weights of each linear layer to
      reproduce its dense outputs on the calibration inputs (optimal-brain-surgeon updates column
      by column from the Gram matrix X^T X + ``refit_damping`` * mean(diag) * I, in lazy blocks
      of 128 columns, the mask chosen by ``score`` block by block on the updated weights), layer
      after layer and within a layer in forward order, so each sees the pruned ones before it;
      ``none`` only zeroes. Leaving both ``score`` and ``refit`` unset gives the measured best
      combination per kind (``wanda`` + ``sparsegpt`` unstructured, ``ria`` + ``sparsegpt``
      N:M); naming a ``score`` without ``refit`` means no refit, so ``score: wanda`` is Wanda
      exactly. The version records both resolved values.
    per_layer_ratios: a ratio per layer (only those layers are pruned unless ``layers`` is
      given), or ``owl`` (unstructured): OWL's outlier-weighted ratios (Yin et al., 2024), each
      layer's sparsity lowered in proportion to its share of Wanda scores above
      ``owl_threshold`` times the layer's mean, spread over at most +-``owl_lambda`` around
      ``ratio`` and averaging to it; the version records the ratios it resolved to.

    ratio: the fraction removed in each pruned layer (weights, or MLP neurons when structured).
    refit_damping: the refit's damping, as a fraction of the Gram matrix's mean diagonal.
    refit_inputs (with the refit): inside a layer, each group of linear layers that reads one
      input (q/k/v, o, gate/up, down) is refitted on the inputs the already pruned ones before
      it give (``pruned``: one calibration pass of the layer per group), or every group on the
      dense layer's inputs (``dense``: one pass, SparseGPT's default). Layers always see the
      pruned layers below them. Unset: ``pruned`` (the better on dev text; ``dense`` is about a
      third faster); the version records the value.
    owl_threshold, owl_lambda: OWL's outlier cut (a multiple of the layer's mean score) and the
      most a layer's ratio may differ from ``ratio``.
    n, m (nm): ``n`` zeros in every group of ``m`` consecutive inputs of a row.
    prune_heads (structured): KV head groups removed per layer, a count or a fraction.
    layers: the decoder layers pruned (default: all).
    uniform_widths (structured): every layer keeps the same width (see below).
    calibration_samples, calibration_seqlen, calibration_batch_size: calibration windows, their
      length in tokens, and windows per forward pass.
    calibration_data: the text to calibrate on, a file under the data roots or a shared data
      set (JSONL files give their ``text`` fields); default WikiText-2 validation.
    evaluate_perplexity: WikiText-2 test perplexity before and after.
    measure_latency (structured): time one forward pass before and after.
    seed: which calibration windows are drawn.

    Metrics (gate names): ``parameters_before``, ``parameters_after``, ``parameter_ratio``,
    ``bytes_before``, ``bytes_after`` (parameter bytes, the safetensors file size estimate),
    ``sparsity`` (zero or removed fraction of the pruned decoder-block weights),
    ``perplexity_before``, ``perplexity_after``, ``perplexity_ratio`` (WikiText-2 test, when
    ``evaluate_perplexity``), ``latency_before_s``, ``latency_after_s``, ``latency_ratio``
    (forward pass on one calibration window, structured only), ``prune_seconds``,
    ``bias_compensation`` (1 when applied). Artifacts: ``layer_sparsity.json`` (per-module
    shapes and sparsity), ``kept_structure.json`` (kept neurons / KV heads per layer).

    calibration_dtype: ``auto`` (default) runs the calibration forwards in bfloat16 autocast
    where bf16 matmuls are fast on the device (CUDA with bf16, a CPU with AMX or AVX-512-BF16)
    and in float32 elsewhere; the version records the value it resolved to.

    bias_compensation (structured): the removed neurons' mean output goes into the MLP output
    bias (FLAP). Llama-style MLPs without bias get zero gate/up biases and ``mlp_bias: true``
    so ``from_pretrained`` still loads the export; families that cannot take one skip it.

    Uniform widths (default) keep every layer the same width so ``from_pretrained`` loads the
    export. With ``uniform_widths: false`` (different per-layer ratios or a subset of
    ``layers``) the per-layer widths go into config overrides ``modelsurgery_mlp_widths`` /
    ``modelsurgery_kv_heads`` and only ``modelsurgery.models.load`` (through
    ``modelsurgery.pruning.apply_pruned_config``) can load the result.
    """

    method: Literal["prune"] = "prune"
    text_source_fields: ClassVar[tuple[str, ...]] = ("calibration_data",)
    kind: Literal["structured", "unstructured", "nm"] = "unstructured"
    score: Score | None = None
    refit: Refit | None = None
    refit_damping: float = Field(default=0.01, gt=0.0, le=1.0)
    refit_inputs: RefitInputs | None = None
    ratio: float = Field(default=0.5, gt=0.0, lt=1.0)
    per_layer_ratios: dict[int, float] | Literal["owl"] | None = None
    owl_threshold: float = Field(default=5.0, gt=1.0)
    owl_lambda: float = Field(default=0.08, gt=0.0, lt=0.5)
    n: int = Field(default=2, ge=1)
    m: int = Field(default=4, ge=2)
    prune_heads: int | float | None = None
    layers: list[int] | None = None
    uniform_widths: bool = True
    bias_compensation: bool = False
    calibration_samples: int = Field(default=128, ge=1, le=limits.MAX_CALIBRATION_SAMPLES)
    calibration_seqlen: int = Field(default=512, ge=2, le=limits.MAX_SEQUENCE_TOKENS)
    calibration_batch_size: int = Field(default=8, ge=1, le=limits.MAX_BATCH_SIZE)
    calibration_data: str | None = None
    calibration_dtype: DtypeSetting = "auto"
    evaluate_perplexity: bool = True
    measure_latency: bool = True
    seed: int = 0

    def metric_names(self) -> set[str]:
        names = {"parameters_before", "parameters_after", "parameter_ratio", "sparsity"}
        names |= {"bytes_before", "bytes_after", "prune_seconds"}
        if self.kind == "structured":
            names.add("bias_compensation")
            if self.measure_latency:
                names |= {"latency_before_s", "latency_after_s", "latency_ratio"}
        return names

    @field_validator("per_layer_ratios")
    @classmethod
    def _ratios_in_range(
        cls, value: dict[int, float] | Literal["owl"] | None
    ) -> dict[int, float] | Literal["owl"] | None:
        for layer, r in (value if isinstance(value, dict) else {}).items():
            if not 0.0 < r < 1.0:
                raise ValueError(f"per_layer_ratios[{layer}]: ratio {r} must be in (0, 1)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PruneConfig:
        if self.kind == "nm" and self.n >= self.m:
            raise ValueError(f"n: N ({self.n}) must be smaller than M ({self.m})")
        if self.kind == "nm" and self.per_layer_ratios is not None:
            raise ValueError("per_layer_ratios: not used by kind 'nm' (sparsity is n/m)")
        if self.per_layer_ratios == "owl":
            if self.kind != "unstructured":
                raise ValueError("per_layer_ratios: 'owl' is for kind 'unstructured'")
            if not 0.0 < self.ratio - self.owl_lambda < self.ratio + self.owl_lambda < 1.0:
                raise ValueError(
                    f"owl_lambda: ratio {self.ratio} +- {self.owl_lambda} must stay in (0, 1)"
                )
        if self.refit_inputs is not None and self._resolved_refit() == "none":
            raise ValueError("refit_inputs: only with refit: sparsegpt")
        if self.kind == "structured":
            if self.score == "ria":
                raise ValueError("score: 'ria' is for kinds 'unstructured' and 'nm'")
            if self.refit not in (None, "none"):
                raise ValueError("refit: only for kinds 'unstructured' and 'nm'")
        if self.kind != "structured":
            if self.prune_heads is not None:
                raise ValueError("prune_heads: head pruning needs kind 'structured'")
            if self.bias_compensation:
                raise ValueError("bias_compensation: only for kind 'structured'")
            if self.score == "activation":
                raise ValueError("score: 'activation' is for kind 'structured' (use 'wanda')")
        if isinstance(self.prune_heads, float) and not 0.0 < self.prune_heads < 1.0:
            raise ValueError(f"prune_heads: ratio {self.prune_heads} must be in (0, 1)")
        if isinstance(self.prune_heads, int) and self.prune_heads < 0:
            raise ValueError(f"prune_heads: {self.prune_heads} must be >= 0")
        if self.kind == "structured" and self.uniform_widths:
            ratios = set(self.ratio_table().values())
            if len(ratios) > 1:
                raise ValueError(
                    "per_layer_ratios: different ratios give non-uniform widths; "
                    "set uniform_widths: false"
                )
        return self

    # --- resolved values ---------------------------------------------------------------------
    def ratio_table(self) -> dict[int, float]:
        """The explicit per-layer ratios (none before ``owl`` is resolved on the model)."""
        return self.per_layer_ratios if isinstance(self.per_layer_ratios, dict) else {}

    def layer_ratio(self, layer: int) -> float:
        return self.ratio_table().get(layer, self.ratio)

    def selected_layers(self, num_layers: int) -> list[int]:
        if isinstance(self.per_layer_ratios, dict) and self.layers is None:
            return sorted(self.per_layer_ratios)
        return sorted(set(self.layers)) if self.layers is not None else list(range(num_layers))

    def _resolved_refit(self) -> Refit:
        structured = self.kind == "structured"
        default_refit = "none" if structured or self.score is not None else DEFAULT_SPARSE_REFIT
        return self.refit or default_refit

    def with_defaults(self) -> PruneConfig:
        """``score``, ``refit`` and ``refit_inputs`` filled: the measured best pair when neither
        score nor refit is given, no refit when only a score is; the refit's inputs."""
        score = self.score or DEFAULT_SPARSE_SCORE.get(self.kind, "wanda")
        refit = self._resolved_refit()
        refit_inputs = self.refit_inputs
        if refit == "sparsegpt" and refit_inputs is None:
            refit_inputs = DEFAULT_REFIT_INPUTS
        if (score, refit, refit_inputs) == (self.score, self.refit, self.refit_inputs):
            return self
        update = {"score": score, "refit": refit, "refit_inputs": refit_inputs}
        return self.model_copy(update=update)

    def kv_groups_to_remove(self, num_kv_heads: int) -> int:
        if self.prune_heads is None:
            return 0
        if isinstance(self.prune_heads, float):
            return round(self.prune_heads * num_kv_heads)
        return self.prune_heads

    def resolved(self, model_config: Any) -> PruneConfig:
        """The pruned layers, score and refit as ``run`` selects them."""
        config = self.with_defaults()
        if config.layers is not None:
            return config
        return config.model_copy(
            update={"layers": config.selected_layers(layer_count(model_config))}
        )

    # --- validation against the base model ---------------------------------------------------
    def check_against(self, model_config: Any) -> None:
        dims = ModelDims.from_config(model_config)
        for field, indices in (
            ("layers", self.layers or []),
            ("per_layer_ratios", sorted(self.ratio_table())),
        ):
            for pos, layer in enumerate(indices):
                if not 0 <= layer < dims.num_layers:
                    where = f"{field}[{pos}]" if field == "layers" else f"{field}[{layer}]"
                    raise ValueError(
                        f"{where}: layer {layer} out of range (model has {dims.num_layers} layers)"
                    )
        selected = self.selected_layers(dims.num_layers)
        if self.kind == "structured":
            self._check_structured(dims, selected)
        if self.kind == "nm":
            for name, size in dims.linear_inputs().items():
                if size % self.m:
                    raise ValueError(
                        f"m: M={self.m} does not divide the input size {size} of {name}"
                    )

    def _check_structured(self, dims: ModelDims, selected: list[int]) -> None:
        if self.uniform_widths and len(selected) != dims.num_layers:
            raise ValueError(
                "layers: pruning a subset of layers gives non-uniform widths; set "
                "uniform_widths: false (the result then loads only via modelsurgery.models.load)"
            )
        for layer in selected:
            keep = dims.intermediate_size - round(self.layer_ratio(layer) * dims.intermediate_size)
            if keep < 1:
                raise ValueError(f"ratio: pruning layer {layer} would leave no MLP neuron")
        remove = self.kv_groups_to_remove(dims.num_kv_heads)
        if remove:
            if not dims.head_pruning_supported:
                raise ValueError(
                    f"prune_heads: head pruning is not supported for model type "
                    f"{dims.model_type!r} (needs separate q/k/v projections and a head_dim config)"
                )
            if remove >= dims.num_kv_heads:
                raise ValueError(
                    f"prune_heads: removing {remove} of {dims.num_kv_heads} KV head groups "
                    "would leave none"
                )


class ModelDims:
    """The sizes a config promises, read without loading weights."""

    def __init__(self, model_type: str, layout: FamilyLayout, config: Any) -> None:
        def first(*names: str) -> int | None:
            for name in names:
                value = getattr(config, name, None)
                if isinstance(value, int):
                    return value
            return None

        hidden = first("hidden_size", "n_embd", "d_model")
        layers = first("num_hidden_layers", "n_layer")
        heads = first("num_attention_heads", "n_head")
        if hidden is None or layers is None or heads is None:
            raise ValueError(f"model config of {model_type!r} lacks hidden/layer/head sizes")
        self.model_type = model_type
        self.hidden_size = hidden
        self.num_layers = layers
        self.num_heads = heads
        self.num_kv_heads = first("num_key_value_heads") or heads
        self.head_dim = first("head_dim") or hidden // heads
        self.intermediate_size = first(layout.intermediate_key, "intermediate_size") or 4 * hidden
        self.head_pruning_supported = layout.fused_qkv is None and hasattr(config, "head_dim")

    @classmethod
    def from_config(cls, config: Any) -> ModelDims:
        from modelsurgery.models.adapters import FAMILIES

        model_type = getattr(config, "model_type", "") or ""
        layout = FAMILIES.get(model_type)
        if layout is None:
            raise ValueError(
                f"method: unsupported architecture {model_type!r} for pruning; "
                f"supported: {', '.join(sorted(FAMILIES))}"
            )
        return cls(model_type, layout, config)

    def linear_inputs(self) -> dict[str, int]:
        """Input sizes of the decoder-block linear layers (N:M groups run along these)."""
        return {
            "attention inputs": self.hidden_size,
            "attention output": self.num_heads * self.head_dim,
            "mlp input": self.hidden_size,
            "mlp output": self.intermediate_size,
        }
