"""A fact to edit, in the CounterFact / EasyEdit field layout, so dev records are valid as they are.

``prompt`` names the subject either written out or as ``{}``; ``target_new`` is the object the
edit should make the model say. The optional evaluation fields may be one string or a list.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TextOrList = str | list[str]


def _as_list(value: TextOrList | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


class Fact(BaseModel):
    """One fact: ``subject`` + ``prompt`` -> ``target_new``.

    ``case_id`` is accepted (and not used) because CounterFact records carry it; any other
    unknown key is an error, so a misspelt field is never silently dropped.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1)
    subject: str = Field(min_length=1)
    target_new: str = Field(min_length=1)
    ground_truth: TextOrList | None = None
    rephrase_prompt: TextOrList | None = None
    locality_prompt: TextOrList | None = None
    locality_ground_truth: TextOrList | None = None
    case_id: int | str | None = None

    @field_validator("target_new")
    @classmethod
    def _target_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("target_new is blank")
        return value

    @model_validator(mode="after")
    def _subject_in_prompt(self) -> Fact:
        if "{}" not in self.prompt and self.subject not in self.prompt:
            raise ValueError(
                f"prompt: must contain the subject {self.subject!r} or '{{}}', got {self.prompt!r}"
            )
        for prompt in self.rephrase_prompts:
            if "{}" not in prompt and self.subject not in prompt:
                raise ValueError(f"rephrase_prompt: {prompt!r} does not name {self.subject!r}")
        if len(self.locality_prompts) != len(self.locality_ground_truths):
            raise ValueError(
                f"locality_ground_truth: {len(self.locality_ground_truths)} answers for "
                f"{len(self.locality_prompts)} locality prompts"
            )
        return self

    # --- normalised views ----------------------------------------------------------------
    def fill(self, text: str) -> str:
        """A prompt with ``{}`` replaced by the subject (prompts may also name it outright)."""
        return text.replace("{}", self.subject, 1)

    @property
    def text(self) -> str:
        """The edit prompt with the subject written out."""
        return self.fill(self.prompt)

    @property
    def target(self) -> str:
        """``target_new`` as a continuation: with the leading space the tokenizer expects."""
        return continuation(self.target_new)

    @property
    def true_targets(self) -> list[str]:
        return [continuation(t) for t in _as_list(self.ground_truth)]

    @property
    def rephrase_prompts(self) -> list[str]:
        return [self.fill(p) for p in _as_list(self.rephrase_prompt)]

    @property
    def locality_prompts(self) -> list[str]:
        return _as_list(self.locality_prompt)

    @property
    def locality_ground_truths(self) -> list[str]:
        return [continuation(t) for t in _as_list(self.locality_ground_truth)]


def continuation(text: str) -> str:
    """Answers follow the prompt after a space, as in CounterFact (ROME prepends it too)."""
    return text if text[:1].isspace() else " " + text
