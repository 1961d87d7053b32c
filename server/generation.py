"""Text generation from a loaded version, so users and CI can see an edit's effect."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from modelsurgery.proto.limits import MAX_PROMPT_TOKENS

POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
# Lines a chat template may run per prompt. Real templates run hundreds (thousands for a long
# conversation with tools); a million takes about 0.1 s under the tracing that counts them.
MAX_TEMPLATE_STEPS = 1_000_000
# How often (in template lines) a render asks whether its generation must stop.
_STOP_POLL_STEPS = 4096
# The file name Jinja gives the code it compiles a template string to.
_TEMPLATE_FILE = "<template>"


class PromptError(ValueError):
    """A prompt the model cannot continue; ``field`` names it (``prompts[i]``). Built from
    ``(field, detail)`` so it pickles through Ray as it is."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(field, detail)
        self.field = field
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.field} {self.detail}"


class EmptyPromptError(PromptError):
    """A prompt with no tokens: there is nothing to continue."""


class PromptTooLongError(PromptError):
    """A prompt with more tokens than this server generates from."""


class ChatTemplateError(PromptError):
    """The model's chat template ran past its bound (``MAX_TEMPLATE_STEPS``)."""


class GenerationStopped(RuntimeError):
    """Generation was stopped: its caller went away or its deadline passed."""


def check_token_count(count: int, limit: int, field: str) -> None:
    """Refuse a prompt of no tokens or more than ``limit`` (``PromptError`` naming ``field``)."""
    if count == 0:
        raise EmptyPromptError(field, "has no tokens")
    if count > limit:
        raise PromptTooLongError(field, f"has {count} tokens; this model takes at most {limit}")


def prompt_token_limit(model_config: Any) -> int:
    """``MAX_PROMPT_TOKENS``, or the model's positions when it has fewer."""
    for key in POSITION_KEYS:
        positions = getattr(model_config, key, None)
        if isinstance(positions, int) and positions > 0:
            return min(MAX_PROMPT_TOKENS, positions)
    return MAX_PROMPT_TOKENS


class _StopWhen(StoppingCriteria):
    """Ends ``generate`` at the next token once ``should_stop`` says so (polled per token)."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop
        self.fired = False

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        self.fired = self.fired or self.should_stop()
        return torch.full((input_ids.shape[0],), self.fired, device=input_ids.device)


def _bounded_render(render: Callable[[], str], should_stop: Callable[[], bool]) -> str:
    """``render()`` with every line the compiled chat template runs counted (a trace function
    on this thread, for template frames only): past ``MAX_TEMPLATE_STEPS`` it raises
    ``ChatTemplateError``, and once ``should_stop`` says so ``GenerationStopped``. The Jinja
    sandbox bounds each ``range``, not nested loops, and nothing else would interrupt them."""
    steps = 0

    def line(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal steps
        if event == "line":
            steps += 1
            if steps > MAX_TEMPLATE_STEPS:
                raise ChatTemplateError(
                    "chat",
                    f"is on and the model's chat template ran past its bound of "
                    f"{MAX_TEMPLATE_STEPS:,} steps; send the prompts with chat off",
                )
            if steps % _STOP_POLL_STEPS == 0 and should_stop():
                raise GenerationStopped("generation stopped while its chat template rendered")
        return line

    def call(frame: FrameType, event: str, arg: Any) -> Any:
        return line if frame.f_code.co_filename == _TEMPLATE_FILE else None

    previous = sys.gettrace()
    sys.settrace(call)
    try:
        return render()
    finally:
        sys.settrace(previous)


def _prompt_text(tokenizer: Any, prompt: str, chat: bool, should_stop: Callable[[], bool]) -> str:
    if chat and getattr(tokenizer, "chat_template", None):
        return _bounded_render(
            lambda: tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            ),
            should_stop,
        )
    return prompt


@torch.no_grad()
def generate_text(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[str]:
    """Completions (new text only) for each prompt, one prompt at a time so that no padding
    shifts the prompt positions ReFT interventions are attached to. Every prompt is checked
    (chat template within its bound, tokens, ``prompt_token_limit``) before any is generated
    from; ``should_stop`` is polled while a chat template renders and at every new token, and
    raises ``GenerationStopped`` once it is true."""
    device = next(model.parameters()).device
    limit = prompt_token_limit(model.config)
    encoded = []
    for index, prompt in enumerate(prompts):
        text = _prompt_text(tokenizer, prompt, chat, should_stop)
        inputs = tokenizer(text, return_tensors="pt")
        check_token_count(inputs["input_ids"].shape[1], limit, f"prompts[{index}]")
        encoded.append(inputs)
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
    if do_sample:
        options.update(temperature=temperature, top_p=top_p)
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = _StopWhen(should_stop)
    completions = []
    for inputs in encoded:
        if should_stop():
            raise GenerationStopped("generation stopped before it finished")
        torch.manual_seed(seed)
        output = model.generate(
            **inputs.to(device),
            pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList([stop]),
            **options,
        )
        if stop.fired:
            raise GenerationStopped("generation stopped before it finished")
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        completions.append(tokenizer.decode(new_tokens, skip_special_tokens=True))
    return completions
