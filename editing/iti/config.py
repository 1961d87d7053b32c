"""The ``iti`` job config: the contrast texts, which heads, how far to shift them."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from modelsurgery.editing.contrast import PairsSource, TextPair
from modelsurgery.editing.knowledge.config import check_layer, layer_count
from modelsurgery.editing.mask_heads import config_sizes
from modelsurgery.editing.registry import MethodConfig
from modelsurgery.editing.validators import unique_layers
from modelsurgery.proto import limits

# Tuned on the fit-dev part of TruthfulQA dev with SmolLM2-135M-Instruct
# (benchmarks/iti_truthfulqa.py); the figures are in ItiConfig's docstring.
DEFAULT_TOP_K = 16
DEFAULT_ALPHA = 1.0

_SOURCES = ("pairs", "pairs_file", "records", "records_file")
# The prompt of a question record (``editing.iti.records``: fitting and scoring share it).
PROMPT = "Q: {question}\nA:"


class QARecord(BaseModel):
    """A question with its true and false answers (a string is one answer)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    question: str = Field(min_length=1)
    true: list[str] = Field(min_length=1)
    false: list[str] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _answer_keys_as_written(cls, data: Any) -> Any:
        """YAML reads the keys ``true:`` and ``false:`` as booleans (``yaml.safe_load``):
        they are the answers' keys all the same."""
        if isinstance(data, dict) and any(isinstance(key, bool) for key in data):
            return {
                str(key).lower() if isinstance(key, bool) else key: v for key, v in data.items()
            }
        return data

    @field_validator(
        "true",
        "false",
        mode="before",
        json_schema_input_type=str | Annotated[list[str], Field(min_length=1)],
    )
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        answers = value if isinstance(value, list) else [value]
        if any(isinstance(answer, bool) for answer in answers):
            raise ValueError(
                "an answer written yes, no, true or false without quotes was read by YAML as "
                "a boolean: quote it, e.g. 'yes'"
            )
        return [value] if isinstance(value, str) else value

    @field_validator("true", "false")
    @classmethod
    def _non_empty_answers(cls, value: list[str]) -> list[str]:
        if any(not answer.strip() for answer in value):
            raise ValueError("an answer is empty")
        return value

    def prompt(self) -> str:
        return PROMPT.format(question=self.question)

    def text(self, answer: str) -> str:
        """The contrast text of one answer: the prompt with the answer appended."""
        return f"{self.prompt()} {answer}"


class ItiConfig(MethodConfig):
    """Inference-Time Intervention (Li et al. 2023): shift the attention heads whose outputs
    best separate true from false texts along that contrast, baked into the attention output
    projection's bias, so the result is plain weights (no hooks).

    Source (exactly one): ``pairs`` / ``pairs_file`` (``{"positive", "negative"}`` texts, as
    for ``steer``; positive = the side to move toward) or ``records`` / ``records_file``
    (``{"question", "true": [..] | str, "false": [..] | str}``; each answer becomes the text
    ``"Q: {question}\\nA: {answer}"``, labelled true or false). A seeded
    ``probe_holdout_fraction`` of the pairs or records (by pair or question, never splitting
    one) is held out: probes are fitted on the rest and ranked by accuracy on it.

    Fitting: each head's output before the attention output projection at the text's last
    token (``token="last"``, the paper's choice) or averaged over its tokens (``"mean"``),
    in ``layers`` (default all). One L2-regularised logistic-regression probe per (layer,
    head); the ``top_k`` heads by held-out accuracy (ties: lower held-out log-loss) are
    shifted by ``alpha`` x sigma x the unit ``direction``: ``mass_mean`` (mean true minus
    mean false activation on the fit texts; the paper's best) or ``probe`` (the probe's
    weight); sigma = the standard deviation of the fit activations along it. A head shift s
    at the projection's input adds ``W_o[:, head columns] @ s`` to its output at every
    position, which is a bias; families without one on the attention output (Mistral,
    Qwen2) are refused.

    Defaults ``top_k=16``, ``alpha=1``: the tuning grid of ``benchmarks/iti_truthfulqa.py``
    on SmolLM2-135M-Instruct (probes on 143 TruthfulQA dev questions; MC1 on 61 other
    fit-dev questions, base 0.295; k in {4, 16, 32} x alpha in {1, 2, 5}, perplexity ratio at
    most 1.2): k=16, alpha=1 gave 0.328 (2 questions more) at perplexity ratio 1.021, tied
    with alpha=2 and k=32 (the smaller shift wins ties); alpha=5 costs 1.41-1.85x perplexity
    for k >= 16. That gain is within noise: on the 204 report questions MC1 stayed at 0.240
    (chance 0.226), as did random heads with the same shift (0.240-0.245). The paper's
    LLaMA-7B setting is k=48 of 1024 heads, alpha=15.

    Metrics: ``heads_shifted``; ``probe_accuracy_mean`` (mean held-out accuracy of the
    shifted heads' probes), ``probe_accuracy_best`` (the best head's); ``texts_fit``,
    ``texts_heldout`` (contrast texts on each side of the split); with a records source
    ``mc1_before`` / ``mc1_after`` on the held-out records (share whose highest-likelihood
    answer is true: MC1 when each has one true answer; answer log-likelihood = sum of its
    token log-probabilities after ``"Q: {question}\\nA:"``); with ``evaluate_perplexity``
    ``perplexity_before/after/ratio`` (WikiText-2 test, the job's
    protocol). Artifact ``iti_heads.json``: every head's held-out accuracy, the chosen heads,
    their sigma and shift norm.
    """

    method: Literal["iti"] = "iti"
    data_file_fields: ClassVar[tuple[str, ...]] = ("pairs_file", "records_file")
    pairs: list[TextPair] | None = Field(
        default=None,
        max_length=limits.MAX_PAIRS,
        description="Contrast texts {positive, negative}; positive is the side to move toward "
        "(one source of four).",
    )
    pairs_file: str | None = Field(
        default=None,
        description="JSONL of {positive, negative} pairs under the server's data roots.",
    )
    records: list[QARecord] | None = Field(
        default=None,
        max_length=limits.MAX_PAIRS,
        description='Question records {question, true, false}; each answer becomes the text "Q: '
        '{question}\\nA: {answer}".',
    )
    records_file: str | None = Field(
        default=None, description="JSONL of question records under the server's data roots."
    )
    top_k: int = Field(
        default=DEFAULT_TOP_K,
        ge=1,
        le=limits.MAX_HEADS,
        description="How many heads to shift: the best by held-out probe accuracy.",
    )
    alpha: float = Field(
        default=DEFAULT_ALPHA,
        gt=0.0,
        le=1000.0,
        description="Shift size, in standard deviations of the fit activations along the "
        "direction.",
    )
    direction: Literal["mass_mean", "probe"] = Field(
        default="mass_mean",
        description="mass_mean (mean true minus mean false activation) or probe (the probe's "
        "weight).",
    )
    layers: list[int] | None = Field(
        default=None, min_length=1, description="Layers whose heads are probed (default: all)."
    )
    probe_holdout_fraction: float = Field(
        default=0.2,
        gt=0.0,
        lt=1.0,
        description="Share of the pairs or questions held out to rank the probes on (seeded, "
        "never splitting one).",
    )
    seed: int = Field(default=0, description="Seed of the held-out split.")
    token: Literal["last", "mean"] = Field(
        default="last",
        description="Read each head at the text's last token or averaged over its tokens.",
    )
    batch_size: int = Field(
        default=16, ge=1, le=limits.MAX_BATCH_SIZE, description="Texts per forward pass."
    )
    evaluate_perplexity: bool = Field(
        default=True,
        description="Measure WikiText-2 perplexity before and after (the job's protocol).",
    )

    def metric_names(self) -> set[str]:
        names = {"heads_shifted", "probe_accuracy_mean", "probe_accuracy_best"}
        names |= {"texts_fit", "texts_heldout"}
        if self.uses_records():
            names |= {"mc1_before", "mc1_after"}
        return names

    _unique_layers = field_validator("layers")(unique_layers)

    @model_validator(mode="after")
    def _one_source(self) -> ItiConfig:
        given = [name for name in _SOURCES if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"{given[1] if len(given) > 1 else 'pairs'}: give exactly one of "
                f"{', '.join(_SOURCES)}"
            )
        if self.pairs is not None and len(self.pairs) < 3:
            raise ValueError("pairs: at least 3 pairs are needed (2 to fit, 1 held out)")
        if self.records is not None and len(self.records) < 2:
            raise ValueError("records: at least 2 records are needed (1 to fit, 1 held out)")
        return self

    def uses_records(self) -> bool:
        return self.records is not None or self.records_file is not None

    def pairs_source(self) -> PairsSource:
        return PairsSource(pairs=self.pairs, pairs_file=self.pairs_file)

    def layer_indices(self, num_layers: int) -> list[int]:
        return sorted(self.layers) if self.layers is not None else list(range(num_layers))

    def resolved(self, model_config: Any) -> ItiConfig:
        """The probed layers as ``run`` picks them (all, by default)."""
        if self.layers is not None:
            return self
        return self.model_copy(update={"layers": self.layer_indices(layer_count(model_config))})

    def check_against(self, model_config: Any) -> None:
        from modelsurgery.models.output_bias import bias_overrides

        if bias_overrides(model_config, "attn_out") is None:
            raise ValueError(
                f"method: iti bakes head shifts into the attention output projection's bias, "
                f"which {model_config.model_type!r} models cannot have"
            )
        num_layers, num_heads = config_sizes(model_config)
        for i, layer in enumerate(self.layers or []):
            check_layer(f"layers[{i}]", layer, num_layers)
        available = len(self.layer_indices(num_layers)) * num_heads
        if self.top_k > available:
            raise ValueError(f"top_k: {self.top_k} exceeds the {available} heads probed")
