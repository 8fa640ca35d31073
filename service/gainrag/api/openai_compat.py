"""OpenAI-compatible routes: ``POST /v1/chat/completions`` and ``GET /v1/models``.

The last ``user`` message is the question (earlier turns and system messages are not used: the
service answers one question from its corpus); the assistant message is the answer. Streaming
follows OpenAI's ``chat.completion.chunk`` format and ends with ``data: [DONE]``. The selected
passages travel in the extension field ``citations`` (the ``/answer`` passage objects) on the
completion and on the first chunk. Errors use the project's shape, which is OpenAI's
(``{"error": {"message", "type", "code"}}``); one after the first byte is a ``data:`` line with
that object and no ``[DONE]``. Keys and admission apply as for ``/answer``. Any ``model`` name
is accepted (front ends often send their own default); responses name ``gainrag``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response

from gainrag.api.answering import Shape, answer_request, passage_out
from gainrag.api.deps import PipelineDep, PrincipalDep, StateDep
from gainrag.api.schemas import MODEL_ID, ChatCompletionRequest, ModelCard, ModelList
from gainrag.api.streaming import AnswerStream, sse
from gainrag.errors import ValidationFailedError
from gainrag.llm import prompts
from gainrag.llm.interface import prompt_tokens
from gainrag.pipeline import CheckedQuery, Pipeline
from gainrag.types import AnswerResult, Scored
from gainrag.wire import ErrorResponse

router = APIRouter(prefix="/v1", tags=["openai"])
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse}
    for code in (400, 401, 403, 404, 413, 415, 422, 429, 502, 503, 504)
}


@router.get("/models", response_model=ModelList, responses=_ERRORS)
async def models(principal: PrincipalDep) -> ModelList:
    """The one model served here: ``gainrag`` (the whole RAG pipeline)."""
    return ModelList(data=[ModelCard(id=MODEL_ID)])


def _question(body: ChatCompletionRequest) -> str:
    for message in reversed(body.messages):
        if message.role == "user":
            return message.text()
    raise ValidationFailedError("'messages' has no user message", code="no_user_message")


def _citations(selected: list[Scored]) -> list[dict[str, Any]]:
    return [passage_out(s).model_dump(exclude_none=True) for s in selected]


def _usage(pipeline: Pipeline, question: str, result: AnswerResult) -> dict[str, int] | None:
    """Token counts from the generator's tokenizer, when it has one locally (None otherwise):
    the answer prompt, and the answer's text (the returned content, not the raw generation)."""
    g = pipeline.c.generator
    passages = [s.passage for s in result.selected]
    prompt = prompt_tokens(
        g, prompts.answer_prompt(question, passages, pipeline.settings.llm.max_passage_words)
    )
    with_answer, empty = prompt_tokens(g, result.answer), prompt_tokens(g, "")
    if prompt is None or with_answer is None or empty is None:
        return None
    completion = with_answer - empty
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


_CHAT_200: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A chat.completion, or with stream=true chat.completion.chunk events "
        "ending with data: [DONE] (see docs/api.md).",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {"data": {"type": "string"}},
                    "required": ["data"],
                }
            },
        },
    }
}


@router.post("/chat/completions", responses={**_ERRORS, **_CHAT_200})
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    principal: PrincipalDep,
    state: StateDep,
    pipeline: PipelineDep,
) -> Response:
    """An OpenAI chat completion whose answer comes from the GainRAG pipeline."""
    question = _question(body)
    head = {
        "id": f"chatcmpl-{request.state.request_id}",
        "created": int(time.time()),
        "model": MODEL_ID,
    }
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    shape = Shape(
        body=lambda checked, result: _json(_completion(head, pipeline, checked, result)),
        events=lambda checked, stream: _chunks(
            stream, head, pipeline, checked.question, include_usage
        ),
        error_event=None,  # a bare data: line, as OpenAI's streams send errors
        stream_x_cache=False,
    )
    return await answer_request(
        request,
        state,
        principal,
        shape,
        route="/v1/chat/completions",
        question=question,
        top_n=body.top_n,
        stream=body.stream,
        cache_control=None,  # not honoured here (docs/api.md): Cache-Control is /answer's
    )


def _completion(
    head: dict[str, Any], pipeline: Pipeline, checked: CheckedQuery, result: AnswerResult
) -> dict[str, Any]:
    """A ``chat.completion`` holding the answer, its usage and its citations."""
    return {
        **head,
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.answer},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": _usage(pipeline, checked.question, result),
        "citations": _citations(result.selected),
    }


def _json(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False).encode()


async def _chunks(
    stream: AnswerStream,
    head: dict[str, Any],
    pipeline: Pipeline,
    question: str,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """The role (and ``citations``) first, content deltas, the finish reason, usage, [DONE]."""

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return sse({**head, "object": "chat.completion.chunk", "choices": [choice], **extra})

    yield chunk({"role": "assistant", "content": ""}, citations=_citations(stream.context.selected))
    async for event in stream.rest():
        if isinstance(event, str):
            yield chunk({"content": event})
        elif isinstance(event, AnswerResult):
            yield chunk({}, "stop")
            if include_usage:
                usage = _usage(pipeline, question, event)
                yield sse(
                    {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}
                )
    yield sse("[DONE]")
