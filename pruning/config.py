"""The `prune` method's config: what to remove, how to score it, and what to measure."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from modelsurgery.editing.knowledge.config import layer_count
from modelsurgery.editing.registry import DtypeSetting, MethodConfig
from modelsurgery.proto import limits

if TYPE_CHECKING:
    from modelsurgery.models.adapters import FamilyLayout


class PruneConfig(MethodConfig):
    """Prune a causal LM from calibration activations.

    kind:
      - ``structured``: physically remove MLP intermediate neurons (gate/up rows + down columns,
        fc_in/fc_out for GPT-2 style) and optionally whole KV head groups; the model gets smaller.
      - ``unstructured``: zero the lowest-scored ``ratio`` of weights in each output row of every
        decoder-block linear layer (Wanda); the checkpoint stays dense.
      - ``nm``: N:M semi-structured sparsity, ``n`` zeros in every group of ``m`` consecutive
        inputs of each row (2:4, 4:8).
    score: ``wanda`` (|W| * ||X||_2 per input; for neurons sqrt(E[h^2]) * ||W_down[:, j]||, or
      std(h) * ||W_down[:, j]|| with bias compensation, the error left after the mean is kept),
      ``magnitude`` (|W|; for neurons the norm of the neuron's rows and column), ``activation``
      (structured only: E|h| * ||W_down[:, j]||, h = act(gate) * up).

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
    kind: Literal["structured", "unstructured", "nm"] = "unstructured"
    score: Literal["wanda", "magnitude", "activation"] = "wanda"
    ratio: float = Field(default=0.5, gt=0.0, lt=1.0)
    per_layer_ratios: dict[int, float] | None = None
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
    def _ratios_in_range(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        for layer, r in (value or {}).items():
            if not 0.0 < r < 1.0:
                raise ValueError(f"per_layer_ratios[{layer}]: ratio {r} must be in (0, 1)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PruneConfig:
        if self.kind == "nm" and self.n >= self.m:
            raise ValueError(f"n: N ({self.n}) must be smaller than M ({self.m})")
        if self.kind == "nm" and self.per_layer_ratios is not None:
            raise ValueError("per_layer_ratios: not used by kind 'nm' (sparsity is n/m)")
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
            ratios = set((self.per_layer_ratios or {}).values())
            if len(ratios) > 1:
                raise ValueError(
                    "per_layer_ratios: different ratios give non-uniform widths; "
                    "set uniform_widths: false"
                )
        return self

    # --- resolved values ---------------------------------------------------------------------
    def layer_ratio(self, layer: int) -> float:
        return (self.per_layer_ratios or {}).get(layer, self.ratio)

    def selected_layers(self, num_layers: int) -> list[int]:
        if self.per_layer_ratios is not None and self.layers is None:
            return sorted(self.per_layer_ratios)
        return sorted(set(self.layers)) if self.layers is not None else list(range(num_layers))

    def kv_groups_to_remove(self, num_kv_heads: int) -> int:
        if self.prune_heads is None:
            return 0
        if isinstance(self.prune_heads, float):
            return round(self.prune_heads * num_kv_heads)
        return self.prune_heads

    def resolved(self, model_config: Any) -> PruneConfig:
        """The pruned layers as ``run`` selects them."""
        if self.layers is not None:
            return self
        return self.model_copy(update={"layers": self.selected_layers(layer_count(model_config))})

    # --- validation against the base model ---------------------------------------------------
    def check_against(self, model_config: Any) -> None:
        dims = ModelDims.from_config(model_config)
        for field, indices in (
            ("layers", self.layers or []),
            ("per_layer_ratios", sorted(self.per_layer_ratios or {})),
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
