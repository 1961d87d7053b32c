"""Text generation from a loaded version, so users and CI can see an edit's effect."""

from __future__ import annotations

from typing import Any

import torch


class EmptyPromptError(ValueError):
    """A prompt with no tokens: there is nothing to continue."""


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
) -> list[str]:
    """Completions (new text only) for each prompt, one prompt at a time so that no padding
    shifts the prompt positions ReFT interventions are attached to."""
    device = next(model.parameters()).device
    completions = []
    for index, prompt in enumerate(prompts):
        if chat and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = prompt
        inputs = tokenizer(text, return_tensors="pt").to(device)
        if inputs["input_ids"].shape[1] == 0:
            raise EmptyPromptError(f"prompts[{index}] has no tokens")
        torch.manual_seed(seed)
        options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
        if do_sample:
            options.update(temperature=temperature, top_p=top_p)
        else:
            options.update(temperature=None, top_p=None, top_k=None)
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        output = model.generate(**inputs, pad_token_id=pad, **options)
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        completions.append(tokenizer.decode(new_tokens, skip_special_tokens=True))
    return completions
