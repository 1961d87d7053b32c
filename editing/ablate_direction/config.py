"""The ``ablate_direction`` job config: where the direction comes from and where it is read."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from modelsurgery.editing.contrast import PairsSource, TextPair
from modelsurgery.editing.data import CROWS_PAIRS_PATH, WINOGENDER_DIR
from modelsurgery.editing.knowledge.config import layer_count
from modelsurgery.editing.mask_heads import config_sizes
from modelsurgery.editing.registry import MethodConfig
from modelsurgery.evaluation.metrics import PAIRS
from modelsurgery.proto import limits

Dataset = Literal["winogender", "crows-pairs-gender"]
# What the stream's component along the direction becomes (``mean_fill``).
Fill = Literal["zero", "mean"]
# Read depth as a fraction of the layers when ``layer`` is not given: layer 14 of SmolLM2's 30.
DEFAULT_DEPTH = 0.48


class AblateDirectionConfig(MethodConfig):
    """Directional ablation (Arditi et al. 2024): find one direction d in the residual stream
    from contrast pairs and orthogonalise every matrix that writes to the stream against it, so
    no layer's output has a component along d for any input. The result is plain weights.

    Pairs (exactly one source):
    - ``pairs`` / ``pairs_file``: ``{"positive", "negative"}`` texts (``PairsSource``).
    - ``dataset: "winogender"``: the 240 WinoGender male/female sentence pairs (positive = the
      female sentence), which differ in the pronoun alone: a pure gender direction.
    - ``dataset: "crows-pairs-gender"``: the CrowS-Pairs gender pairs (positive = the more
      stereotypical sentence); its stereotype sides mix genders, so ``aggregate: "pca"`` (the
      axis the differences vary along, sign-free) finds the gender axis, ``"mean"`` a
      stereotype-vs-anti direction.
    A seeded ``holdout_fraction`` of the contrast pairs is never used to fit d; the projection
    figures are measured on it. With a gender dataset the stereotype share is measured on the
    CrowS-Pairs gender pairs held out by ``split_pairs(pairs, holdout_fraction, seed)`` (for
    ``crows-pairs-gender`` the same pairs d was not fitted on), which the job carries as its
    ``pairs`` suite.

    layer: the decoder layer whose output d is read at; default ``round(DEFAULT_DEPTH x
        (layers - 1))`` = 14 on SmolLM2-135M's 30, measured with WinoGender pairs only (fit on
        half the occupations, judged on the other half; ``benchmarks/bias_control.py``): of
        layers 0-16 it brought the dev stereotype share nearest 0.5 (0.60 -> 0.50) at the
        smallest perplexity cost among the middle layers (x1.047; layers 0-8 cost x1.07-1.6
        and overshoot to 0.45, layers 10/16/18 cost x1.05-1.08).
    token: ``"mean"`` (default; average over the text's tokens, since a gendered word sits
        mid-sentence and the tokens before it are the same on both sides) or ``"last"``.
    aggregate: ``"mean"`` difference of the pairs' activations or the top principal component
        of the differences (``editing.contrast.contrast_direction``).
    fill: what the stream's component along d becomes. ``"zero"``: removed from every write
        (the stream never has one). ``"mean"``: held after each layer L at mu_L, the mean
        projection on d of the unedited model's layer-L output over every token of
        ``calibration_windows`` random ``calibration_window``-token windows of WikiText-2
        validation (seeded by ``seed``), through a bias along d on each layer's MLP output
        projection (``editing.ablate_direction.mean_fill``; Llama gets ``mlp_bias``, and the
        zero gate/up biases it adds are stored too); the variation along d is removed, its
        offset kept. Families whose MLP output projection can have no bias (Mistral, Qwen2)
        are refused. Default ``"mean"``, measured on WinoGender only (the layer-choice protocol of
        ``benchmarks/bias_control.py``: fit on half the occupations, dev share on the other half,
        base 0.600; perplexity on 2048 WikiText-2 test tokens). Layer 10: zero 0.533 at x1.054, mean
        0.533 at x1.062; layer 14: zero 0.500 at x1.047, mean 0.558 at x1.037; layer 18: zero 0.533
        at x1.081, mean 0.558 at x1.082. No setting reaches x1.03; the rule (share nearest 0.5
        within x1.03, else the cheapest) picks mean at layer 14, which keeps the default layer but
        removes less of the dev bias than zero fill does there.
    calibration_windows / calibration_window: the calibration text of ``fill: "mean"``.
    seed: the held-out split and the calibration windows. batch_size: texts per forward pass.
    evaluate_perplexity: WikiText-2 test perplexity before and after (the job's protocol).

    Metrics: ``pairs_fit``, ``pairs_heldout`` (contrast pairs), ``direction_norm`` (length of
    the raw contrast direction before normalising), ``projection_before`` (held-out texts'
    mean |projection| on d at ``layer``), ``projection_after`` (the largest mean distance of the
    projection on d from the value it is held at, 0 or mu_L, over all layers after ablation;
    ~0), ``fill_at_layer`` (that value at ``layer``: 0 for ``"zero"``),
    ``separation_before/after`` (mean projection of positive minus negative held-out
    activations on d at ``layer``: > 0 = d generalises; ~0 after); with a gender dataset
    ``stereotype_share_before/after`` (share of held-out CrowS-Pairs gender pairs where the
    stereotype is more likely; 0.5 = unbiased),
    ``bias_gap_before/after`` (mean log-likelihood gap, nats), ``bias_pairs_heldout``; with
    ``evaluate_perplexity`` ``perplexity_before/after/ratio``.
    """

    method: Literal["ablate_direction"] = "ablate_direction"
    data_file_fields: ClassVar[tuple[str, ...]] = ("pairs_file",)
    pairs: list[TextPair] | None = Field(
        default=None,
        max_length=limits.MAX_PAIRS,
        description="Inline contrast pairs {positive, negative} (one source of three).",
    )
    pairs_file: str | None = Field(
        default=None,
        description="JSONL of {positive, negative} pairs under the server's data roots.",
    )
    dataset: Dataset | None = Field(
        default=None,
        description="A shipped pair set instead of pairs: winogender or crows-pairs-gender.",
    )
    holdout_fraction: float = Field(
        default=0.5,
        gt=0.0,
        lt=1.0,
        description="Share of the contrast pairs never used to fit the direction; the projection "
        "figures are measured on it.",
    )
    layer: int | None = Field(default=None, ge=0)
    token: Literal["last", "mean"] = "mean"
    aggregate: Literal["mean", "pca"] = "mean"
    fill: Fill = "mean"
    calibration_windows: int = Field(default=4, ge=1, le=limits.MAX_CALIBRATION_SAMPLES)
    calibration_window: int = Field(default=128, ge=2, le=limits.MAX_SEQUENCE_TOKENS)
    seed: int = Field(
        default=0, description="Seed of the held-out split and the calibration windows."
    )
    batch_size: int = Field(
        default=16, ge=1, le=limits.MAX_BATCH_SIZE, description="Texts per forward pass."
    )
    evaluate_perplexity: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> AblateDirectionConfig:
        if self.dataset is None and self.pairs is None and self.pairs_file is None:
            raise ValueError("pairs: give one of pairs, pairs_file and dataset")
        if self.dataset is None:
            self.source()
        elif self.pairs is not None or self.pairs_file is not None:
            raise ValueError("dataset: give either dataset or pairs / pairs_file, not both")
        return self

    def shared_data(self) -> dict[str, tuple[str, ...]]:
        """Both gender data sets also read CrowS-Pairs (the stereotype share's pairs)."""
        if self.dataset is None:
            return {}
        winogender = (WINOGENDER_DIR,) if self.dataset == "winogender" else ()
        return {"dataset": (CROWS_PAIRS_PATH, *winogender)}

    @property
    def carries(self) -> frozenset[str]:  # type: ignore[override]
        """Stereotype pairs are the job's suite only with a gender dataset."""
        return frozenset({PAIRS}) if self.dataset is not None else frozenset()

    def source(self) -> PairsSource:
        """The user's pairs (validated by ``PairsSource``: exactly one of the two fields)."""
        return PairsSource(pairs=self.pairs, pairs_file=self.pairs_file)

    def resolved_layer(self, num_layers: int) -> int:
        return self.layer if self.layer is not None else round(DEFAULT_DEPTH * (num_layers - 1))

    def resolved(self, model_config: Any) -> AblateDirectionConfig:
        """The layer d is read at, as ``run`` picks it."""
        return self.model_copy(update={"layer": self.resolved_layer(layer_count(model_config))})

    def metric_names(self) -> set[str]:
        names = {"pairs_fit", "pairs_heldout", "direction_norm", "fill_at_layer"}
        names |= {f"{m}_{w}" for m in ("projection", "separation") for w in ("before", "after")}
        if self.dataset is not None:
            names |= {"bias_pairs_heldout"}
            names |= {
                f"{m}_{w}" for m in ("stereotype_share", "bias_gap") for w in ("before", "after")
            }
        return names

    def check_against(self, model_config: Any) -> None:
        from modelsurgery.editing.ablate_direction.orthogonalize import unsupported_reason
        from modelsurgery.models.output_bias import bias_overrides

        reason = unsupported_reason(model_config)
        if reason is not None:
            raise ValueError(f"method: ablate_direction cannot orthogonalise {reason}")
        layers, _ = config_sizes(model_config)
        if self.layer is not None and self.layer >= layers:
            raise ValueError(f"layer: {self.layer} is out of range, the model has {layers} layers")
        if self.fill == "mean" and bias_overrides(model_config, "mlp_out") is None:
            raise ValueError(
                f"fill: mean needs a bias on the MLP output projection, which "
                f"{model_config.model_type!r} models cannot have; use fill: zero"
            )
