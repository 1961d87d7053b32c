"""PredictConcepts: concepts and the label a concept_bottleneck version predicts for texts,
optionally after intervening on a user's corrections and with token attributions per concept.
The servicer half checks the request's bounds and the version; the worker half runs on the
warm model with the version's hooks attached for this call only (as Generate does)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from modelsurgery.checkpoints import CheckpointStore
from modelsurgery.checkpoints.store import VersionNotFoundError
from modelsurgery.models.stored import stored_artifact_names
from modelsurgery.proto import limits
from modelsurgery.server.errors import abort
from modelsurgery.server.generation import PromptError
from modelsurgery.v1 import jobs_pb2

MAX_CONCEPT_TEXTS = 64
BOTTLENECK_ARTIFACT = "concepts/config.json"


def request_problem(request: jobs_pb2.PredictConceptsRequest) -> tuple[str, str] | None:
    """(field, message) for the first bound the request breaks, else None."""
    if not request.ref:
        return "ref", "must not be empty"
    if not 0 < len(request.texts) <= MAX_CONCEPT_TEXTS:
        return "texts", f"give 1 to {MAX_CONCEPT_TEXTS} texts"
    for index, text in enumerate(request.texts):
        if not text.strip():
            return f"texts[{index}]", "is empty"
        if len(text) > limits.MAX_PROMPT_CHARS:
            return (
                f"texts[{index}]",
                f"has {len(text)} characters; at most {limits.MAX_PROMPT_CHARS}",
            )
    if request.intervene and len(request.corrections) != len(request.texts):
        return (
            "corrections",
            f"intervene needs one correction per text: {len(request.corrections)} for "
            f"{len(request.texts)} texts",
        )
    if not request.intervene and request.corrections:
        return "corrections", "are only used with intervene"
    return None


async def predict_concepts_rpc(
    store: CheckpointStore,
    worker: Any,
    request: jobs_pb2.PredictConceptsRequest,
    context: grpc.aio.ServicerContext,
) -> jobs_pb2.PredictConceptsResponse:
    from modelsurgery.server.checkpoint_service import cancelled_with_caller

    problem = request_problem(request)
    if problem is not None:
        await abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem[1], problem[0])
    try:
        manifest = await asyncio.to_thread(store.get, request.ref)
    except VersionNotFoundError:
        await abort(
            context, grpc.StatusCode.NOT_FOUND, f"no version or alias {request.ref!r}", "ref"
        )
    names = await asyncio.to_thread(stored_artifact_names, store, manifest.id)
    if BOTTLENECK_ARTIFACT not in names:
        await abort(
            context,
            grpc.StatusCode.FAILED_PRECONDITION,
            "the version carries no concept bottleneck (make one with a concept_bottleneck job)",
            "ref",
        )
    corrections = [dict(c.concepts) for c in request.corrections] if request.intervene else None
    try:
        predictions = await cancelled_with_caller(
            worker.predict_concepts.remote(
                manifest.id, list(request.texts), corrections, request.explain
            )
        )
    except PromptError as exc:
        cause = getattr(exc, "cause", exc)
        await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(cause), cause.field)
    return jobs_pb2.PredictConceptsResponse(
        predictions=[prediction_message(p) for p in predictions], version_id=manifest.id
    )


def prediction_message(prediction: Mapping[str, Any]) -> jobs_pb2.ConceptPrediction:
    """The worker's dict as the message; ``explain``'s (token, score) pairs as TokenScores."""
    fields = dict(prediction)
    explain = fields.pop("explain", None) or {}
    message = jobs_pb2.ConceptPrediction(**fields)
    for name, scores in explain.items():
        message.explain[name].tokens.extend(
            jobs_pb2.TokenScore(token=token, score=score) for token, score in scores
        )
    return message


def concept_predictions(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    corrections: Sequence[Mapping[str, str]] | None,
    explain: bool = False,
) -> list[dict[str, Any]]:
    """The worker half: each text checked (tokens, the model's positions), then predicted
    with the bottleneck attached to ``model`` (with ``explain``, token attributions per
    concept: one backward pass per concept and text); bad input raises ``PromptError``
    naming it."""
    from modelsurgery.editing.concepts import attached_bottleneck, predict_concepts
    from modelsurgery.server.generation import check_token_count, prompt_token_limit

    limit = prompt_token_limit(model.config)
    for index, text in enumerate(texts):
        check_token_count(len(tokenizer(text).input_ids), limit, f"texts[{index}]")
    try:
        bottleneck = attached_bottleneck(model)
        out = predict_concepts(model, tokenizer, bottleneck, texts, corrections, explain)
    except ValueError as exc:
        field, _, detail = str(exc).partition(": ")
        raise PromptError(field if detail else "ref", detail or str(exc)) from None
    return [
        {
            "label": p.label,
            "concepts": p.concepts,
            "label_before": p.label_before or "",
            "concepts_before": p.concepts_before or {},
            "explain": p.explain or {},
        }
        for p in out
    ]
