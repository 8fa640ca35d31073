"""Route handlers: thin wrappers that validate, call the pipeline and shape the response."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from gainrag.api.cancel import until_disconnect
from gainrag.api.deps import CheckedQueryDep, PipelineDep, PrincipalDep, StateDep
from gainrag.api.schemas import (
    AnswerRequest,
    AnswerResponse,
    DegradationOut,
    PassageOut,
    Timings,
)
from gainrag.api.streaming import SSE_HEADERS, AnswerStream, error_body, guarded, sse
from gainrag.errors import UnavailableError
from gainrag.llm.interface import generator_failure
from gainrag.pipeline import Pipeline
from gainrag.types import AnswerResult, Scored
from gainrag.wire import ErrorResponse

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 413, 415, 422, 429, 502, 503, 504)
}


def passage_out(s: Scored) -> PassageOut:
    p = s.passage
    return PassageOut(
        id=p.id,
        title=p.title,
        text=p.text,
        score=s.score,
        pseudo=p.pseudo,
        retrieval_rank=s.retrieval_rank,
        retrieval_score=s.retrieval_score,
        selector_score=s.selector_score,
    )


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
    checked: CheckedQueryDep,
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
    # Others' no-cache would be a cache-bypass lever on the expensive path: ignored, not refused.
    use_cache = not (_no_cache(cache_control) and principal.can_refresh)
    if wants_stream(request, body.stream):
        stream = await AnswerStream.open(
            request, state, principal, "/answer", checked, use_cache=use_cache
        )
        return StreamingResponse(
            guarded(_answer_events(stream, request, body, pipeline), _error_event),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, "x-cache": "HIT" if stream.context.cached else "MISS"},
        )
    # The slot is taken here, after every dependency: FastAPI raises body-validation errors only
    # once all dependencies ran, so a slot taken in one would turn a burst of 422s into 429s.
    async with state.admission.slot(principal, "/answer"):
        result = await until_disconnect(request, pipeline.answer(checked, use_cache=use_cache))
    out = answer_response(request, result, pipeline.models, body.return_candidates)
    # Serialised here, once, in pydantic's Rust core: returning the model would make FastAPI
    # validate it a second time against response_model (a measurable share of gateway CPU).
    return Response(
        out.model_dump_json(exclude_none=True),
        media_type="application/json",
        headers={"x-cache": "HIT" if result.cached else "MISS"},
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


def _error_event(exc: BaseException) -> bytes:
    return sse(error_body(exc), "error")


def _no_cache(header: str | None) -> bool:
    if not header:
        return False
    directives = {d.strip().split("=", 1)[0].lower() for d in header.split(",")}
    return bool(directives & {"no-cache", "no-store"})


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
