"""A model's chat template renders under a bound (issue 29): a template that loops for ever
(10^9 iterations: the Jinja sandbox bounds each ``range`` to 10^5, not nested loops) is
refused naming the template, or stopped at the Generate deadline, instead of rendering long
after it while holding the warm model's lock."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import bounded, build_tiny_tokenizer, tiny_model

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.server.executor import WorkerSettings, load_base
from modelsurgery.server.generation import (
    ChatTemplateError,
    GenerationStopped,
    PromptError,
    generate_text,
)
from modelsurgery.server.worker import SurgeryWorker

# Bounds a regression (a template rendering for minutes) so the test fails instead of hanging.
JOIN_SECONDS = 30.0
LOOPS_1E9 = (
    "{% for i in range(100000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"
    "{{ messages[0]['content'] }}"
)


def tokenizer_with(template: str) -> Any:
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def test_a_template_that_loops_1e9_times_is_refused_naming_the_template() -> None:
    model, tokenizer = tiny_model("llama"), tokenizer_with(LOOPS_1E9)
    with pytest.raises(ChatTemplateError) as caught:
        bounded(
            lambda: generate_text(model, tokenizer, ["paris"], max_new_tokens=1, chat=True),
            JOIN_SECONDS,
            "the template render",
        )
    assert caught.value.field == "chat"
    assert "chat template" in str(caught.value)
    assert isinstance(caught.value, PromptError)  # the servicer answers INVALID_ARGUMENT


def test_a_template_stops_rendering_once_the_generation_must_stop() -> None:
    model, tokenizer = tiny_model("llama"), tokenizer_with(LOOPS_1E9)
    polls: list[int] = []

    def stop() -> bool:
        polls.append(1)
        return True

    with pytest.raises(GenerationStopped):
        bounded(
            lambda: generate_text(model, tokenizer, ["paris"], chat=True, should_stop=stop),
            JOIN_SECONDS,
            "the template render",
        )
    assert len(polls) == 1  # polled while rendering, not only once it was done


def test_an_ordinary_template_renders_and_tracing_is_given_back() -> None:
    model = tiny_model("llama")
    template = "{% for m in messages %}{{ m.content }} {% endfor %}{% if add_generation_prompt %}"
    tokenizer = tokenizer_with(template + "the{% endif %}")

    def tracer(*args: Any) -> None:
        return None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        text = generate_text(model, tokenizer, ["paris"], max_new_tokens=2, chat=True)
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(previous)
    plain = generate_text(model, tokenizer, ["paris the"], max_new_tokens=2)
    assert text == plain


def test_the_error_keeps_its_field_through_pickling() -> None:
    copied = pickle.loads(pickle.dumps(ChatTemplateError("chat", "ran too long")))
    assert (type(copied), copied.field) == (ChatTemplateError, "chat")


def test_the_worker_refuses_the_template_and_frees_the_model(
    store: CheckpointStore, tmp_path: Path
) -> None:
    version = store.import_model(
        tiny_model("llama"), tokenizer_with(LOOPS_1E9), reference="looping-template"
    ).id
    worker = SurgeryWorker(WorkerSettings(store_root=store.root, cache_dir=tmp_path / "c"), 1)
    options = {"max_new_tokens": 1, "chat": True}
    with pytest.raises(ChatTemplateError):
        bounded(
            lambda: worker.generate(version, ["paris"], options, 600.0),
            JOIN_SECONDS,
            "the template render",
        )
    base = load_base(version, worker.store, worker.cache, worker.settings)
    assert base.lock.acquire(blocking=False)
    base.lock.release()
    assert worker.generate(version, ["paris"], {"max_new_tokens": 1}, 600.0)
