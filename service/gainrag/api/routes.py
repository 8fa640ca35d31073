"""Route handlers: thin wrappers that shape the response of :mod:`gainrag.api.answering`'s
request skeleton (``/answer``), and the health probes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse

from gainrag.api.answering import Shape, answer_request, passage_out
from gainrag.api.deps import PipelineDep, PrincipalDep, StateDep
from gainrag.api.schemas import AnswerRequest, AnswerResponse, DegradationOut, Timings
from gainrag.api.streaming import AnswerStream, sse
from gainrag.errors import UnavailableError
from gainrag.llm.interface import generator_failure
from gainrag.pipeline import Pipeline
from gainrag.types import AnswerResult
from gainrag.wire import ErrorResponse

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 413, 415, 422, 429, 502, 503, 504)
}


_SSE_200: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            "text/event-stream": {
                # One server-sent event (schemathesis validates each event against it).
                "schema": {
                    "type": "object",
                    "properties": {
                        "event": {"enum": ["passages", "token", "done", "error"]},
                        "data": {"type": "string", "description": "JSON"},
                    },
                    "required": ["event", "data"],
                },
                "description": "With stream=true or Accept: text/event-stream: events passages, "
                "token*, then done (an AnswerResponse) or error (see docs/api.md).",
            }
        }
    }
}


def wants_stream(request: Request, stream: bool) -> bool:
    """``"stream": true`` in the body, or an ``Accept`` header that asks for events."""
    return stream or "text/event-stream" in request.headers.get("accept", "").lower()


@router.post(
    "/answer",
    response_model=AnswerResponse,
    responses={**_ERRORS, **_SSE_200},
    response_model_exclude_none=True,
)
async def answer(
    body: AnswerRequest,
    request: Request,
    principal: PrincipalDep,
    state: StateDep,
    pipeline: PipelineDep,
    cache_control: Annotated[str | None, Header()] = None,
) -> Response:
    """Answer a question with GainRAG: retrieve || pseudo-passage, select, generate.

    ``Cache-Control: no-cache`` computes a fresh answer (and stores it) instead of reading the
    cache, for keys allowed to refresh (every caller when keys are off); ``cached`` and the
    ``X-Cache`` header say whether the answer came from it.

    With ``"stream": true`` (or ``Accept: text/event-stream``) the answer streams as Server-Sent
    Events: ``passages`` (the citation, before any token), ``token`` deltas, then ``done`` with
    this same response object, or ``error``.
    """
    shape = Shape(
        body=lambda _, result: _answer_json(request, result, pipeline, body),
        events=lambda _, stream: _answer_events(stream, request, body, pipeline),
        error_event="error",
    )
    return await answer_request(
        request,
        state,
        principal,
        shape,
        route="/answer",
        question=body.question,
        top_n=body.top_n,
        stream=wants_stream(request, body.stream),
        cache_control=cache_control,
    )


def answer_response(
    request: Request, result: AnswerResult, models: dict[str, str], return_candidates: bool
) -> AnswerResponse:
    """The body of a successful ``/answer`` (also the data of the ``done`` event)."""
    return AnswerResponse(
        request_id=request.state.request_id,
        answer=result.answer,
        passages=[passage_out(s) for s in result.selected],
        candidates=[passage_out(s) for s in result.candidates] if return_candidates else None,
        pseudo_passage=result.pseudo_passage,
        timings_ms=Timings(**result.timings_ms),
        models=models,
        cached=result.cached,
        degraded=[DegradationOut(kind=d.kind, message=d.message) for d in result.degraded],
    )


def _answer_json(
    request: Request, result: AnswerResult, pipeline: Pipeline, body: AnswerRequest
) -> str:
    """The body of a successful ``/answer``, as JSON text."""
    # Serialised here, once, in pydantic's Rust core: returning the model would make FastAPI
    # validate it a second time against response_model (a measurable share of gateway CPU).
    out = answer_response(request, result, pipeline.models, body.return_candidates)
    return out.model_dump_json(exclude_none=True)


async def _answer_events(
    stream: AnswerStream, request: Request, body: AnswerRequest, pipeline: Pipeline
) -> AsyncIterator[bytes]:
    """``passages``, ``token``*, ``done`` (see docs/api.md)."""
    ctx = stream.context
    yield sse(
        {
            "request_id": request.state.request_id,
            "selected": [passage_out(s).model_dump(exclude_none=True) for s in ctx.selected],
            "candidates": [passage_out(s).model_dump(exclude_none=True) for s in ctx.candidates],
            "pseudo_passage": ctx.pseudo_passage,
            # The stages so far (zeros for a cached answer); done has generate and total.
            "timings_ms": {k: ctx.timings_ms.get(k, 0.0) for k in ("retrieve", "pseudo", "select")},
            "degraded": [{"kind": d.kind, "message": d.message} for d in ctx.degraded],
            "models": pipeline.models,
            "cached": ctx.cached,
        },
        "passages",
    )
    async for event in stream.rest():
        if isinstance(event, str):
            yield sse({"text": event}, "token")
        elif isinstance(event, AnswerResult):
            out = answer_response(request, event, pipeline.models, body.return_candidates)
            yield sse(out.model_dump_json(exclude_none=True), "done")


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process is up and serving HTTP."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"model": ErrorResponse}})
async def ready(state: StateDep) -> JSONResponse:
    """Readiness: models and index are loaded, and the server is not draining."""
    if state.admission.drain.draining:
        raise UnavailableError("the server is shutting down", code="shutting_down")
    pipeline = state.require_pipeline()
    reason = generator_failure(pipeline.c.generator)  # a managed LLM engine that died
    if reason is not None:
        raise UnavailableError(reason, code="llm_down")
    return JSONResponse({"status": "ready", "models": pipeline.models})
